//! Deterministic initialisers for delta tensors. Every tensor draws from its own counter-based
//! stream (seed, delta name, site path, tensor name), so initial values do not depend on the
//! order in which deltas are attached, nor on any RNG crate's algorithm version.

use crate::error::Result;
use crate::ops::DropoutKey;
use candle_core::{DType, Device, Tensor};

/// A stream of random numbers for one tensor.
#[derive(Clone, Copy, Debug)]
pub struct Stream(DropoutKey);

impl Stream {
    pub fn new(seed: u64, parts: &[&str]) -> Self {
        let mut k = DropoutKey(seed ^ 0xD1B5_4A32_D192_ED03);
        for p in parts {
            k = k.derive(p);
        }
        Stream(k)
    }

    pub fn derive(self, tag: &str) -> Self {
        Stream(self.0.derive(tag))
    }

    /// U[low, high) values.
    pub fn uniform(self, shape: &[usize], low: f32, high: f32, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64).map(|i| low + (high - low) * self.0.uniform(i)).collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// N(mean, std²) values (Box–Muller on pairs of uniforms).
    pub fn normal(self, shape: &[usize], mean: f32, std: f32, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let u1 = (self.0.uniform(2 * i) as f64).max(1e-12);
                let u2 = self.0.uniform(2 * i + 1) as f64;
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                mean + std * z as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// Normal values redrawn until inside [mean - 2 std, mean + 2 std] (torch's trunc_normal_
    /// with bounds at two standard deviations).
    pub fn trunc_normal(self, shape: &[usize], std: f32, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let mut j = 0u64;
                loop {
                    let u1 = (self.0.uniform(2 * (i + j * n as u64)) as f64).max(1e-12);
                    let u2 = self.0.uniform(2 * (i + j * n as u64) + 1) as f64;
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    if z.abs() <= 2.0 || j > 64 {
                        return std * z.clamp(-2.0, 2.0) as f32;
                    }
                    j += 1;
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// torch's `kaiming_uniform_(a=sqrt(5))`, the nn.Linear default: U(±1/sqrt(fan_in)).
    pub fn kaiming_uniform(self, shape: &[usize], fan_in: usize, device: &Device) -> Result<Tensor> {
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        self.uniform(shape, -bound, bound, device)
    }

    /// Xavier/Glorot uniform: U(±gain·sqrt(6/(fan_in+fan_out))).
    pub fn xavier_uniform(self, shape: &[usize], fan_in: usize, fan_out: usize, gain: f32, device: &Device) -> Result<Tensor> {
        let bound = gain * (6.0 / (fan_in + fan_out).max(1) as f32).sqrt();
        self.uniform(shape, -bound, bound, device)
    }
}

pub fn zeros(shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros(shape, DType::F32, device)?)
}

pub fn ones(shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::ones(shape, DType::F32, device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_deterministic_and_distinct() {
        let d = Device::Cpu;
        let a = Stream::new(1, &["lora", "q"]).normal(&[1000], 0.0, 1.0, &d).unwrap();
        let b = Stream::new(1, &["lora", "q"]).normal(&[1000], 0.0, 1.0, &d).unwrap();
        let c = Stream::new(2, &["lora", "q"]).normal(&[1000], 0.0, 1.0, &d).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        assert_ne!(a.to_vec1::<f32>().unwrap(), c.to_vec1::<f32>().unwrap());
        let v = Stream::new(3, &["x"]).normal(&[20000], 0.5, 2.0, &d).unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!((mean - 0.5).abs() < 0.05 && (var.sqrt() - 2.0).abs() < 0.05, "{mean} {var}");
        let u = Stream::new(4, &["k"]).kaiming_uniform(&[8, 384], 384, &d).unwrap().to_vec2::<f32>().unwrap();
        let bound = 1.0 / 384f32.sqrt();
        assert!(u.iter().flatten().all(|x| x.abs() <= bound));
        let t = Stream::new(5, &["t"]).trunc_normal(&[5000], 0.01, &d).unwrap().to_vec1::<f32>().unwrap();
        assert!(t.iter().all(|x| x.abs() <= 0.02));
    }
}
