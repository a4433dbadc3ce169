//! `ha.state-file`: the role and epoch a node had, kept across restarts (a small JSON file,
//! written rarely: at role changes).

use std::io;
use std::path::Path;

use bgs_proto::ha::HaRole;

/// The role and epoch a node had when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRole {
    pub role: HaRole,
    pub epoch: u64,
}

/// Reads a state file; `Ok(None)` when it does not exist yet.
pub fn read_state(path: &Path) -> io::Result<Option<SavedRole>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes it durably: a temporary file, fsync, rename, fsync of the directory.
pub fn write_state(path: &Path, saved: SavedRole) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(
        serde_json::to_string(&saved)
            .map_err(io::Error::other)?
            .as_bytes(),
    )?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
