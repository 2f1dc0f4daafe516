//! Symlinks made so that no reader ever sees a half-made one: a link is created under a
//! temporary name in the same directory and `rename(2)`d over the final name, which replaces an
//! old link atomically (docs/host.md). Removing is `unlink(2)`, which an NBD server that has the
//! file open does not notice: its clients keep their connection.

use std::io;
use std::path::{Path, PathBuf};

/// Makes `link` a symlink to `target`, replacing whatever link was there, atomically.
pub(super) async fn replace(target: &Path, link: &Path) -> io::Result<()> {
    let dir = link.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", link.display()),
        )
    })?;
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    tokio::fs::symlink(target, &tmp).await?;
    if let Err(e) = tokio::fs::rename(&tmp, link).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    Ok(())
}

/// Removes `link`; `false` when there was nothing to remove.
pub(super) async fn remove(link: &Path) -> io::Result<bool> {
    match tokio::fs::remove_file(link).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Where `link` points, if it is a symlink.
pub(super) async fn target(link: &Path) -> Option<PathBuf> {
    tokio::fs::read_link(link).await.ok()
}

/// The entries of `dir` (not the temporary ones of [`replace`]); empty when it does not exist.
pub(super) async fn entries(dir: &Path) -> io::Result<Vec<String>> {
    let mut read = match tokio::fs::read_dir(dir).await {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    while let Some(entry) = read.next_entry().await? {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_link_is_replaced_in_place_and_removed_once() {
        let dir = std::env::temp_dir().join(format!("vd-links-{}", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&dir).await.expect("dir");
        let link = dir.join("vol1234abcd");
        replace(Path::new("/dev/vdb"), &link).await.expect("create");
        replace(Path::new("/dev/vdc"), &link)
            .await
            .expect("re-point");
        assert_eq!(target(&link).await, Some(PathBuf::from("/dev/vdc")));
        assert_eq!(
            entries(&dir).await.expect("list"),
            vec!["vol1234abcd"],
            "no temporary left"
        );
        assert!(remove(&link).await.expect("remove"));
        assert!(
            !remove(&link).await.expect("again"),
            "nothing the second time"
        );
        assert!(
            entries(&dir.join("absent"))
                .await
                .expect("absent dir")
                .is_empty()
        );
        tokio::fs::remove_dir_all(&dir).await.expect("clean up");
    }
}
