//! Outputs appear whole or not at all: data goes to a temporary file in the target folder,
//! renamed over the final name only once complete; dropped uncommitted, it is removed.

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// Refuse an output whose folder does not exist (before any work is done).
pub fn check_output_dir(dest: &Path) -> Result<()> {
    let parent = parent_dir(dest);
    if !parent.is_dir() {
        bail!(
            "{}: output folder {} does not exist",
            dest.display(),
            parent.display()
        );
    }
    Ok(())
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<AtomicFile> {
        check_output_dir(dest)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = parent_dir(dest).join(format!(".{name}.ftconv-{}.tmp", std::process::id()));
        let f = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            writer: Some(BufWriter::with_capacity(1 << 22, f)),
        })
    }

    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("writer taken")
    }

    /// Flush, sync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let mut w = self.writer.take().expect("writer taken");
        w.flush()
            .with_context(|| format!("{}: write failed", self.tmp.display()))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all().ok();
        drop(f);
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("{}: cannot rename into place", self.dest.display()))?;
        Ok(())
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer.take();
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A whole output folder built under a temporary name and renamed at the end. If the
/// destination exists, it must be an empty folder or an earlier ftconv output (it is
/// replaced only when the new one is complete).
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    pub fn create(dest: &Path) -> Result<AtomicDir> {
        check_output_dir(dest)?;
        if dest.exists() && !dest.is_dir() {
            bail!("{}: exists and is not a folder", dest.display());
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let tmp = parent_dir(dest).join(format!(".{name}.ftconv-{}.tmp", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).ok();
        }
        std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Path of a file inside the (temporary) folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    pub fn commit(mut self) -> Result<()> {
        if self.dest.exists() {
            // replace: move the old folder aside first, then remove it
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.dest, &old)
                .with_context(|| format!("{}: cannot replace", self.dest.display()))?;
            std::fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("{}: cannot rename into place", self.dest.display()))?;
            std::fs::remove_dir_all(&old).ok();
        } else {
            std::fs::rename(&self.tmp, &self.dest)
                .with_context(|| format!("{}: cannot rename into place", self.dest.display()))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}
