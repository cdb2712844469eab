//! Debian kernels for the guests: downloaded with `apt-get download` from a
//! private apt state (the host's sources and lists stay untouched), unpacked
//! with `dpkg -x`, never installed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::util::{output, run_status};

/// A kernel series as the EKS AMIs run it, and the Debian release that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Series {
    /// Amazon Linux 2: Debian 11 (bullseye) 5.10.
    #[value(name = "5.10")]
    V5_10,
    /// Amazon Linux 2023, Bottlerocket: Debian 12 (bookworm) 6.1.
    #[value(name = "6.1")]
    V6_1,
}

impl Series {
    pub fn name(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
        }
    }

    fn debian_release(self) -> &'static str {
        match self {
            Self::V5_10 => "bullseye",
            Self::V6_1 => "bookworm",
        }
    }

    /// Amazon Linux 2 still mounts the cgroup v1 hierarchies; AL2023 and
    /// Bottlerocket mount only cgroup2.
    pub fn cgroup_v1(self) -> bool {
        self == Self::V5_10
    }
}

/// An unpacked kernel package.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// e.g. `linux-image-6.1.0-56-amd64-unsigned`.
    pub package: String,
    /// Debian version, e.g. `6.1.192-2`.
    pub version: String,
    /// `uname -r`, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// Root of the unpacked package (`boot/`, `lib/modules/`).
    pub root: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// The upstream version, e.g. `6.1.192` (Debian's minus the revision).
    pub fn upstream_version(&self) -> &str {
        self.version.split('-').next().unwrap_or(&self.version)
    }
}

/// Name of the stamp written last: its presence means the unpack completed.
const STAMP: &str = "kernel.stamp";

/// The cached kernel of `series`, downloading and unpacking it on first use.
/// Delete the directory to move to a newer Debian kernel.
pub fn ensure(series: Series, dir: &Path) -> anyhow::Result<Kernel> {
    if let Some(kernel) = read_stamp(series, dir) {
        eprintln!(
            "    cached: {} {} in {}",
            kernel.package,
            kernel.version,
            kernel.root.display()
        );
        return Ok(kernel);
    }
    let apt = Apt::new(series, &dir.join("apt"))?;
    apt.update()?;
    // `linux-image-amd64` depends on the current ABI's signed image; its
    // `-unsigned` twin is the same kernel without the Secure Boot signature.
    let signed = apt.first_dependency("linux-image-amd64", "linux-image-")?;
    let package = format!("{signed}-unsigned");
    let download = dir.join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    eprintln!("    downloading {package} ({})", series.debian_release());
    apt.download(&package, &download)?;
    let deb = single_deb(&download)?;

    let root = dir.join("kernel");
    let _ = fs::remove_dir_all(&root);
    eprintln!("    unpacking {}", deb.display());
    run_status(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let version = String::from_utf8_lossy(
        &output(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&deb)
                .arg("Version"),
        )?
        .stdout,
    )
    .trim()
    .to_owned();
    let release = kernel_release(&root)?;
    // Debian generates modules.dep at install time (postinst); the initramfs
    // and the guest's modprobe need it.
    run_status(Command::new("depmod").arg("-b").arg(&root).arg(&release))
        .context("depmod (package kmod) on the unpacked kernel")?;
    fs::remove_dir_all(&download)?;

    let kernel = Kernel {
        series,
        package,
        version,
        release,
        root,
    };
    fs::write(
        dir.join(STAMP),
        format!(
            "{}\n{}\n{}\n",
            kernel.package, kernel.version, kernel.release
        ),
    )?;
    Ok(kernel)
}

fn read_stamp(series: Series, dir: &Path) -> Option<Kernel> {
    let text = fs::read_to_string(dir.join(STAMP)).ok()?;
    let mut lines = text.lines();
    let kernel = Kernel {
        series,
        package: lines.next()?.to_owned(),
        version: lines.next()?.to_owned(),
        release: lines.next()?.to_owned(),
        root: dir.join("kernel"),
    };
    (kernel.vmlinuz().is_file() && kernel.modules().join("modules.dep").is_file()).then_some(kernel)
}

fn single_deb(dir: &Path) -> anyhow::Result<PathBuf> {
    let debs: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => anyhow::bail!("expected one .deb in {}, found {debs:?}", dir.display()),
    }
}

/// `uname -r` of the unpacked kernel: the one directory under lib/modules.
fn kernel_release(root: &Path) -> anyhow::Result<String> {
    let modules = root.join("lib/modules");
    let releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match releases.as_slice() {
        [release] => Ok(release.clone()),
        _ => anyhow::bail!(
            "expected one kernel in {}, found {releases:?}",
            modules.display()
        ),
    }
}

/// apt with its own sources list, lists and caches under `dir`.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    fn new(series: Series, dir: &Path) -> anyhow::Result<Self> {
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives/partial"))?;
        let release = series.debian_release();
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={keyring}] http://deb.debian.org/debian {release} main\n\
                 deb [signed-by={keyring}] http://deb.debian.org/debian-security {release}-security main\n"
            ),
        )?;
        let options = [
            format!("Dir::Etc::SourceList={}", sources.display()),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", lists.display()),
            format!("Dir::Cache={}", cache.display()),
            // Downloads land in a root-owned directory `_apt` cannot write.
            "APT::Sandbox::User=root".to_owned(),
        ]
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect();
        Ok(Self { options })
    }

    fn update(&self) -> anyhow::Result<()> {
        output(
            Command::new("apt-get")
                .args(&self.options)
                .args(["-q", "update"]),
        )
        .context("apt-get update of the private Debian lists")?;
        Ok(())
    }

    /// The first dependency of `package` whose name starts with `prefix`.
    fn first_dependency(&self, package: &str, prefix: &str) -> anyhow::Result<String> {
        let text = output(
            Command::new("apt-cache")
                .args(&self.options)
                .args(["depends", package]),
        )?;
        let text = String::from_utf8_lossy(&text.stdout);
        text.lines()
            .filter_map(|line| line.trim().strip_prefix("Depends:"))
            .map(str::trim)
            .find(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| {
                format!("no {prefix}* dependency in `apt-cache depends {package}`:\n{text}")
            })
    }

    fn download(&self, package: &str, into: &Path) -> anyhow::Result<()> {
        output(
            Command::new("apt-get")
                .args(&self.options)
                .args(["-q", "download", package])
                .current_dir(into),
        )?;
        Ok(())
    }
}
