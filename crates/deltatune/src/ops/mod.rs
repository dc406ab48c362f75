//! Differentiable building blocks of the backbones and deltas, one file per op family.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward, and its generic `matmul`
//! backward also computes gradients for frozen weights. Each public function here picks the
//! fastest implementation that keeps gradients flowing to everything that is trainable: a fused
//! CPU kernel with a hand-written backward where we have one, otherwise a composition of
//! differentiable candle ops. The composition (`*_composed`) is also the reference the kernel is
//! tested against in its family's file, and the path for non-CPU devices.
//!
//! | file | ops |
//! |---|---|
//! | `linear.rs` | `linear`, `linear_gelu`, `qlinear` (frozen weights: input gradient only), `lora_linear` (frozen weights with a trained low-rank update, one op), `low_rank_rows` (inference) |
//! | `qmatmul.rs` | the Q4_1 quantized matmul behind `qlinear` (inference rows, AVX2) |
//! | `combine.rs` | `add_frozen`, `scale_last` (a delta joining frozen activations) |
//! | `norm.rs` | `layer_norm`, `residual_layer_norm` (dropout + residual sum + layer norm, one op), `rms_norm` |
//! | `activation.rs` | `gelu`, `gelu_tanh`, `swiglu` |
//! | `dropout.rs` | `dropout` (counter-based mask, regenerated in backward) |
//! | `attention.rs` | `attention`, `causal_attention`, `mask_to_bias`, `softmax_composed` |
//! | `block.rs` | `encoder_block`: a whole BERT-family layer (frozen maps with their deltas, attention, GELU, both residual norms) as one op with a hand-written backward — the block engine |
//! | `engine_hooks.rs` | the deltas the engines compute themselves: `MapDelta` (a LoRA or an (IA)³ `Scale` on a map), trained biases and norm parameters, packed into one argument |
//! | `decoder_block.rs` | `decoder_block`: a whole Llama-family layer (RMS norms, q/k/v with rotary, causal grouped-query attention, SwiGLU, f32 or quantized maps with any LoRA) as one op — the block engine for decoders |
//! | `head_gemm.rs` | the register-blocked product `attention` runs a head's products on (heads of a multiple of 16) |
//! | [`pool`] (`pool.rs`) | buffers the engines reuse across steps (`DELTATUNE_POOL=0` allocates afresh) |
//! | `rope.rs` | `rope` |
//! | `loss.rs` | `picked_log_prob`, `head_log_prob` (frozen LM head + picked log-probability, one op, no logits kept), `log_softmax` |
//! | [`cpu`] (`cpu.rs`) | what the kernels share: `gemm`, vectorised maths, parallel loops, generic ops |

mod activation;
mod attention;
mod block;
mod decoder_block;
mod engine_hooks;
mod combine;
pub mod cpu;
mod dropout;
mod head_gemm;
mod linear;
mod loss;
mod norm;
pub mod pool;
mod qmatmul;
pub mod profile;
pub(crate) mod rng;
mod rope;

pub use activation::{gelu, gelu_composed, gelu_tanh, swiglu, swiglu_composed};
pub use engine_hooks::{Act, Adapter, MapDelta, Scale};
pub use decoder_block::{decoder_block, decoder_block_composed, DecoderBlock, DECODER_LINEARS};
pub use block::{encoder_block, encoder_block_composed, engine_enabled, Dense, EncoderBlock, LowRank, BLOCK_LINEARS};
pub use attention::{attention, attention_composed, causal_attention, causal_attention_composed, mask_to_bias, softmax_composed};
pub use combine::{add_frozen, add_frozen_composed, scale_last, scale_last_composed};
pub use cpu::{in_pool, set_threads};
pub use dropout::{dropout, dropout_composed};
pub use linear::{FrozenWeight, linear, linear_composed, linear_gelu, linear_gelu_composed, lora_linear, lora_linear_composed, lora_qlinear, low_rank_rows, qlinear, LOW_RANK_ROWS};
pub use loss::{head_log_prob, head_log_prob_composed, log_softmax, picked_log_prob, picked_log_prob_composed, HeadWeight};
pub use norm::{layer_norm, layer_norm_composed, residual_layer_norm, residual_layer_norm_composed, rms_norm, rms_norm_composed};
pub use rng::{hash_str, in_batch_rows, DropoutKey};
pub use rope::{rope, rope_composed};
