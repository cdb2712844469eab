//! `cargo xtask image`: the agent's container image without a container
//! engine — the release binary and the shared libraries `ldd` lists (glibc,
//! libgcc_s, the loader), nothing else, as one reproducible layer (sorted,
//! root-owned, mtime 0) in an OCI image layout archive that `skopeo copy
//! oci-archive:… docker://…` or `podman load` take. The Dockerfile builds the
//! same content on distroless.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::json;

use crate::util::{output, run_status, step};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Writes `target/image/resptrace-<version>.oci.tar` from `binary`; returns its path.
pub fn build(binary: &Path, version: &str) -> anyhow::Result<PathBuf> {
    step("image: root filesystem (binary + ldd)");
    let out = crate::workspace_root().join("target/image");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    let rootfs = out.join("rootfs");
    copy_into(&rootfs, binary, Path::new("/usr/bin/resptrace"))?;
    let libraries = shared_libraries(binary)?;
    for library in &libraries {
        // At the path the loader looks for, the symlink's target copied.
        copy_into(&rootfs, &fs::canonicalize(library)?, library)?;
    }

    step("image: layer, config, manifest (OCI image layout)");
    let layout = out.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let layer_tar = out.join("layer.tar");
    run_status(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mtime=@0",
                "-C",
            ])
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer_tar)
            .arg("."),
    )?;
    let diff_id = sha256(&layer_tar)?;
    run_status(
        Command::new("gzip")
            .args(["-9", "-n", "-k"])
            .arg(&layer_tar),
    )?;
    let layer = blob(&blobs, &out.join("layer.tar.gz"))?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/resptrace"],
            "User": "0:0",
            "Labels": {"org.opencontainers.image.version": version},
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
    });
    let config = blob_bytes(&blobs, config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config.0, "size": config.1},
        "layers": [{"mediaType": LAYER, "digest": layer.0, "size": layer.1}],
    });
    let manifest = blob_bytes(&blobs, manifest.to_string().as_bytes())?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": manifest.0,
            "size": manifest.1,
            "annotations": {"org.opencontainers.image.ref.name": version},
        }],
    });
    fs::write(layout.join("index.json"), index.to_string())?;
    fs::write(
        layout.join("oci-layout"),
        json!({"imageLayoutVersion": "1.0.0"}).to_string(),
    )?;
    let archive = out.join(format!("resptrace-{version}.oci.tar"));
    run_status(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "-C"])
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;

    let mib = |path: &Path| -> anyhow::Result<f64> {
        Ok(fs::metadata(path)?.len() as f64 / (1024.0 * 1024.0))
    };
    eprintln!(
        "    files: /usr/bin/resptrace, {}",
        libraries
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "    layer {:.1} MiB ({:.1} MiB gzipped), manifest {}",
        mib(&layer_tar)?,
        layer.1 as f64 / (1024.0 * 1024.0),
        manifest.0
    );
    eprintln!("    ok: {} ({:.1} MiB)", archive.display(), mib(&archive)?);
    Ok(archive)
}

/// Absolute paths of the libraries the dynamic loader would map, the
/// loader included (`ldd`; the vDSO has no file).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = output(Command::new("ldd").arg(binary))?;
    let libraries: Vec<PathBuf> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x…)`.
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    anyhow::ensure!(
        libraries
            .iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "ldd named no dynamic loader for {}: {libraries:?}",
        binary.display()
    );
    Ok(libraries)
}

fn copy_into(rootfs: &Path, source: &Path, at: &Path) -> anyhow::Result<()> {
    let target = rootfs.join(at.strip_prefix("/").unwrap_or(at));
    fs::create_dir_all(target.parent().expect("a file has a parent"))?;
    fs::copy(source, &target)
        .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    Ok(())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let listing = output(Command::new("sha256sum").arg(path))?;
    let text = String::from_utf8_lossy(&listing.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?
        .to_owned())
}

/// Moves `file` into the blob store; its digest and size.
fn blob(blobs: &Path, file: &Path) -> anyhow::Result<(String, u64)> {
    let digest = sha256(file)?;
    let size = fs::metadata(file)?.len();
    fs::rename(file, blobs.join(&digest))?;
    Ok((format!("sha256:{digest}"), size))
}

fn blob_bytes(blobs: &Path, bytes: &[u8]) -> anyhow::Result<(String, u64)> {
    let file = blobs.join("incoming");
    fs::write(&file, bytes)?;
    blob(blobs, &file)
}
