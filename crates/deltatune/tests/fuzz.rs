//! Fuzzing of the parsers that read user files and flags: GGUF headers, safetensors headers,
//! delta configs (`delta_config.json`, `--delta-config`), PEFT `adapter_config.json`, CSV/TSV/JSONL
//! data files and `--delta` spec strings. A deterministic mutation fuzzer (bit flips, byte
//! insertions and deletions, duplicated ranges, truncation, "interesting" values) starts from the
//! seed corpus in `tests/fixtures/fuzz/<parser>/` and runs each parser on every mutant inside
//! `catch_unwind`: every input must give `Ok` or an `Err`, never a panic. A crashing input is
//! written to the corpus (`crash-<hash>`), so it is replayed by every later run once committed.
//!
//! Bounded: `FUZZ_SECONDS` per parser (default 2) and at most 5,000 mutants each; `FUZZ_SEED`
//! picks another stream. `cargo test -p deltatune --test main fuzz -- --nocapture` prints counts.

use crate::common::{fixture, write_tiny_model};
use deltatune::artifacts::peft;
use deltatune::data::readers::{read_user_split, Columns, Format, UserOptions};
use deltatune::delta::spec::parse_config_file;
use deltatune::delta::DeltaSpec;
use deltatune::io::gguf::GgufFile;
use deltatune::io::TensorFile;
use deltatune::{BertModel, Device};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// SplitMix64: a tiny, fixed generator (results do not depend on a crate's version).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[&[u8]] = &[
    b"\x00", b"\xff", b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"-1", b"0", b"1e309", b"NaN", b"\"", b"{", b"}", b"[", b"]",
    b",", b"\n", b"\r\n", b"\t", b":", b"=", b"+", b"%", b"\xc3\x28", b"null", b"true", b"99999999999999999999",
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(7) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(n + 1);
                let b = (rng.next() & 0xff) as u8;
                v.insert(i, b);
            }
            2 if n > 0 => {
                let i = rng.below(n);
                let len = 1 + rng.below((n - i).min(16));
                v.drain(i..i + len);
            }
            3 if n > 0 => {
                let i = rng.below(n);
                let len = 1 + rng.below((n - i).min(32));
                let chunk = v[i..i + len].to_vec();
                let at = rng.below(n + 1);
                v.splice(at..at, chunk);
            }
            4 => v.truncate(rng.below(n + 1)),
            5 => {
                let s = INTERESTING[rng.below(INTERESTING.len())];
                let i = rng.below(n + 1);
                v.splice(i..i, s.iter().copied());
            }
            _ if n > 0 => {
                // Overwrite a little-endian integer field with an extreme value.
                let i = rng.below(n);
                let s = INTERESTING[rng.below(3)];
                for (k, b) in s.iter().enumerate() {
                    if i + k < v.len() {
                        v[i + k] = *b;
                    }
                }
            }
            _ => {}
        }
    }
    v
}

fn corpus_dir(name: &str) -> PathBuf {
    fixture("fuzz").join(name)
}

/// Runs `parse` on the corpus and on mutants; returns (inputs tried, errors returned).
fn fuzz(name: &str, parse: &dyn Fn(&[u8]) -> bool) -> (usize, usize) {
    let dir = corpus_dir(name);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty(), "{}: empty corpus", dir.display());
    let seconds: f64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let seed: u64 = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut rng = Rng(seed ^ name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let (mut tried, mut errors) = (0, 0);
    let mut run = |input: &[u8]| {
        tried += 1;
        match catch_unwind(AssertUnwindSafe(|| parse(input))) {
            Ok(ok) => errors += usize::from(!ok),
            Err(_) => {
                let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3));
                let path = dir.join(format!("crash-{hash:016x}"));
                std::fs::write(&path, input).unwrap();
                panic!("{name}: a panic on input saved as {}", path.display());
            }
        }
    };
    for c in &corpus {
        run(c);
    }
    let mut i = 0;
    while Instant::now() < deadline && i < 5_000 {
        let m = mutate(&corpus[i % corpus.len()], &mut rng);
        run(&m);
        i += 1;
    }
    println!("fuzz {name}: {tried} inputs, {errors} rejected with an error, no panic");
    (tried, errors)
}

/// Writes `bytes` to a file named `name` in a fresh temporary directory.
fn on_disk(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    (d, p)
}

#[test]
fn gguf_headers() {
    let (tried, _) = fuzz("gguf", &|b| {
        let (_d, p) = on_disk("m.gguf", b);
        GgufFile::open(&p).is_ok()
    });
    assert!(tried > 10);
}

#[test]
fn safetensors_files() {
    let (tried, _) = fuzz("safetensors", &|b| TensorFile::from_bytes(Path::new("f.safetensors"), b, &Device::Cpu).is_ok());
    assert!(tried > 10);
}

#[test]
fn delta_configs() {
    let (tried, _) = fuzz("delta_config", &|b| {
        let text = String::from_utf8_lossy(b);
        parse_config_file(&text, "delta_config.json").is_ok()
    });
    assert!(tried > 10);
}

#[test]
fn peft_adapter_configs() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_model(dir.path(), |_| {});
    let model = BertModel::load(&path, &Device::Cpu).unwrap();
    let (tried, _) = fuzz("adapter_config", &|b| {
        let (_d, p) = on_disk("adapter_config.json", b);
        peft::spec_from_config(&p, &model).is_ok()
    });
    assert!(tried > 10);
}

#[test]
fn data_files() {
    for (name, format, ext) in [("csv", Format::Csv, "csv"), ("tsv", Format::Tsv, "tsv"), ("jsonl", Format::Jsonl, "jsonl")] {
        let (tried, _) = fuzz(name, &|b| {
            let (_d, p) = on_disk(&format!("data.{ext}"), b);
            let cols = Columns { text: "text".into(), text_pair: None, label: "label".into() };
            let opts = UserOptions { split: Default::default(), format: Some(format), header: None, regression: false, labels: None };
            read_user_split(&p, &cols, &opts).is_ok()
        });
        assert!(tried > 10);
    }
}

#[test]
fn delta_spec_strings() {
    let (tried, _) = fuzz("delta_spec", &|b| DeltaSpec::parse_cli(&String::from_utf8_lossy(b)).is_ok());
    assert!(tried > 10);
}
