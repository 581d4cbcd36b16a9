//! The path collections: `files`, `directories` and `symlinks`.
//!
//! Each provider looks at what stands at the resource path *without following a symlink there*
//! (`lstat`, `O_NOFOLLOW`), compares it with the spec, and changes only what differs. Parent
//! directories are followed as usual: only the last component is the resource.
//!
//! # Files
//!
//! - Content comes inline (`content`) or from a URL (`source`, checked against its sha256). With
//!   neither, only the metadata is managed and a missing file is created empty.
//! - New content is never written in place: it goes to a temporary file in the same directory
//!   (`.<name>.comodit-<random>`), which is fsync'd, given its final owner, group and mode, then
//!   renamed over the path; the directory is fsync'd last. A reader sees the old file or the new
//!   one, never a mix, and a failed download or a sha256 mismatch leaves the old file as it was.
//! - A download happens only when the file's sha256 differs from the source's, so a file that is
//!   already right costs one hash and no request. Downloads are bounded in size
//!   ([`MAX_DOWNLOAD_BYTES`]) and time ([`DOWNLOAD_TIMEOUT`], plus connect and stall timeouts);
//!   the usual `*_proxy` environment variables are honoured. URLs are shown with their user-info
//!   and query redacted, since signed URLs carry credentials there.
//! - When only mode, owner or group differ they are fixed on the open file (`fchown`, `fchmod`):
//!   the content, inode and mtime stay.
//! - Owner is set before mode, because the kernel clears setuid/setgid on `chown`; when the spec
//!   does not set a mode, the mode the file had is put back after a `chown`.
//! - A new file without `mode` gets `0644` (not the agent's umask, so the result does not depend on
//!   how the agent was started); a replaced file keeps its previous mode, owner and group unless
//!   the spec sets them.
//! - A symlink standing where the file should be is replaced by the file (as Puppet does); the
//!   link's target is never touched. A directory or a special file there is an error, and is left
//!   as it is.
//! - The parent directory must exist; it is never created silently. A dry run reports a file with
//!   a missing parent as to-be-created rather than failing, because an earlier resource of the
//!   same command may create the parent; the enforce run fails if it still does not exist.
//!
//! # Directories
//!
//! Created one level at a time (`mkdir` of the last component, at `0700` until its owner and mode
//! are set; default mode `0755`, keeping a setgid bit inherited from the parent). `ensure: absent`
//! removes an empty directory; a non-empty one only with `purge: true`, which removes the tree
//! without following any symlink inside it (`std::fs::remove_dir_all` works with
//! `openat`/`unlinkat` and `O_NOFOLLOW`). A purge does cross into file systems mounted inside
//! the tree, as `rm -r` does. `/` is never removed. A symlink standing where a directory should
//! be is an error: replacing it would be a guess about what the link meant, and following it would
//! manage another path than the one named.
//!
//! # Symlinks
//!
//! Created with `symlink`, or re-pointed by creating a temporary link in the same directory and
//! renaming it over the path (atomic). A regular file there is replaced only with `force: true`
//! (atomically too); an empty directory only with `force: true` (removed, then the link created:
//! two steps); a non-empty directory never. `ensure: absent` removes the link, never its target.
//!
//! # Diffs and reads
//!
//! Content shows as `sha256:<hex>`, never as text. Modes are `"0644"` strings, owners and groups
//! names when the host can resolve them (numbers otherwise). Something of another kind at the path
//! shows as field `type` (`"symlink"` → `"file"`). `read` returns the spec's shape
//! (`{"ensure": "absent"}` when missing); when something of another kind stands at the path it
//! returns `{"ensure": "absent", "type": "<kind>"}`.
//!
//! Conflicts (wrong kind at the path, non-empty directory without purge, unknown owner) fail in
//! dry runs as they would when enforced, so compliance reports them.

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use comodit_protocol::ids::validate_abs_path;
use comodit_protocol::{
    ApplyMode, Collection, DirectorySpec, Ensure, FieldDiff, FileSource, FileSpec, Mode,
    ResourceId, Spec, SymlinkSpec,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{field_diff, Change, Provider, ProviderError};

/// Largest file a `source` may deliver, in bytes (1 GiB).
pub const MAX_DOWNLOAD_BYTES: u64 = 1 << 30;
/// Longest a whole download may take, from DNS to the last byte.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest wait for a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a single read may stall; a server that stops sending fails well before the global
/// timeout.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed for a `source` URL.
const MAX_REDIRECTS: u32 = 5;
/// Most entries `list` returns; a larger answer would not fit in a reply.
pub const MAX_LIST_ENTRIES: usize = 50_000;

const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Largest buffer handed to `getpwnam_r` and friends (they ask for more with `ERANGE`).
const MAX_NSS_BUF_BYTES: usize = 1 << 20;
const IO_CHUNK_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Providers
// ---------------------------------------------------------------------------------------------

/// The `files` collection.
pub struct FileProvider {
    /// Built on first download: most applies never download, and building it sets up TLS.
    http: OnceLock<ureq::Agent>,
    max_download_bytes: u64,
    download_timeout: Duration,
}

impl FileProvider {
    pub fn new() -> Self {
        Self::with_download_limits(MAX_DOWNLOAD_BYTES, DOWNLOAD_TIMEOUT)
    }

    /// A provider with other download bounds (tests use small ones to test at the limit).
    pub fn with_download_limits(max_bytes: u64, timeout: Duration) -> Self {
        FileProvider {
            http: OnceLock::new(),
            max_download_bytes: max_bytes,
            download_timeout: timeout,
        }
    }
}

impl Default for FileProvider {
    fn default() -> Self {
        Self::new()
    }
}

/// The `directories` collection.
#[derive(Default)]
pub struct DirectoryProvider;

impl DirectoryProvider {
    pub fn new() -> Self {
        DirectoryProvider
    }
}

/// The `symlinks` collection.
#[derive(Default)]
pub struct SymlinkProvider;

impl SymlinkProvider {
    pub fn new() -> Self {
        SymlinkProvider
    }
}

impl Provider for FileProvider {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let (path, label) = resource_path(Collection::Files, id)?;
        match lstat(path, &label)? {
            None => Ok(json!({"ensure": "absent"})),
            Some((Kind::File, md)) => {
                let meta = Meta::from(&md);
                let sha = hash_file(path, &meta).map_err(|e| io_err(&label, "read", e))?;
                Ok(json!({
                    "ensure": "present",
                    "mode": Mode(meta.mode).to_string(),
                    "owner": user_label(meta.uid),
                    "group": group_label(meta.gid),
                    "sha256": sha,
                    "size": meta.size,
                }))
            }
            Some((kind, _)) => Ok(json!({"ensure": "absent", "type": kind.as_str()})),
        }
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let (path, label) = resource_path(Collection::Files, id)?;
        match spec {
            Spec::File(f) => {
                spec.validate()
                    .map_err(|e| ProviderError::Invalid(format!("{label}: {e}")))?;
                self.apply_file(path, &label, f, mode)
            }
            other => Err(wrong_spec(&label, other)),
        }
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        list_kind(Collection::Files, under, Kind::File)
    }
}

impl Provider for DirectoryProvider {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let (path, label) = resource_path(Collection::Directories, id)?;
        match lstat(path, &label)? {
            None => Ok(json!({"ensure": "absent"})),
            Some((Kind::Directory, md)) => {
                let meta = Meta::from(&md);
                Ok(json!({
                    "ensure": "present",
                    "mode": Mode(meta.mode).to_string(),
                    "owner": user_label(meta.uid),
                    "group": group_label(meta.gid),
                }))
            }
            Some((kind, _)) => Ok(json!({"ensure": "absent", "type": kind.as_str()})),
        }
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let (path, label) = resource_path(Collection::Directories, id)?;
        match spec {
            Spec::Directory(d) => {
                spec.validate()
                    .map_err(|e| ProviderError::Invalid(format!("{label}: {e}")))?;
                apply_dir(path, &label, d, mode)
            }
            other => Err(wrong_spec(&label, other)),
        }
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        list_kind(Collection::Directories, under, Kind::Directory)
    }
}

impl Provider for SymlinkProvider {
    fn read(&self, id: &ResourceId) -> Result<Value, ProviderError> {
        let (path, label) = resource_path(Collection::Symlinks, id)?;
        match lstat(path, &label)? {
            None => Ok(json!({"ensure": "absent"})),
            Some((Kind::Symlink, _)) => {
                let target = fs::read_link(path).map_err(|e| io_err(&label, "readlink", e))?;
                Ok(json!({
                    "ensure": "present",
                    "target": target.to_string_lossy(),
                }))
            }
            Some((kind, _)) => Ok(json!({"ensure": "absent", "type": kind.as_str()})),
        }
    }

    fn apply(
        &self,
        id: &ResourceId,
        spec: &Spec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let (path, label) = resource_path(Collection::Symlinks, id)?;
        match spec {
            Spec::Symlink(s) => {
                spec.validate()
                    .map_err(|e| ProviderError::Invalid(format!("{label}: {e}")))?;
                apply_link(path, &label, s, mode)
            }
            other => Err(wrong_spec(&label, other)),
        }
    }

    fn list(&self, under: Option<&str>) -> Result<Vec<String>, ProviderError> {
        list_kind(Collection::Symlinks, under, Kind::Symlink)
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Where a file's content comes from.
enum Content<'a> {
    /// Neither `content` nor `source`: only metadata is managed.
    Unmanaged,
    Inline(&'a str),
    Source(&'a FileSource),
}

impl Content<'_> {
    fn sha256(&self) -> Option<String> {
        match self {
            Content::Unmanaged => None,
            Content::Inline(s) => Some(hex::encode(Sha256::digest(s.as_bytes()))),
            Content::Source(src) => Some(src.sha256.clone()),
        }
    }
}

impl FileProvider {
    fn apply_file(
        &self,
        path: &Path,
        label: &str,
        spec: &FileSpec,
        mode: ApplyMode,
    ) -> Result<Change, ProviderError> {
        let enforce = mode == ApplyMode::Enforce;
        let found = lstat(path, label)?;

        if spec.ensure == Ensure::Absent {
            return match found {
                None => Ok(Change::none()),
                Some((Kind::File | Kind::Symlink, _)) => {
                    if enforce {
                        fs::remove_file(path).map_err(|e| io_err(label, "remove", e))?;
                        fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
                    }
                    Ok(Change::from_diff(vec![field_diff(
                        "ensure", "present", "absent",
                    )]))
                }
                Some((kind, _)) => Err(ProviderError::Invalid(format!(
                    "{label}: a {} stands at this path, not a file; refusing to remove it",
                    kind.as_str()
                ))),
            };
        }

        let want = WantMeta::resolve(label, spec.mode, &spec.owner, &spec.group)?;
        let content = match (&spec.content, &spec.source) {
            (Some(c), _) => Content::Inline(c),
            (None, Some(src)) => Content::Source(src),
            (None, None) => Content::Unmanaged,
        };
        let want_sha = content.sha256();

        match found {
            Some((Kind::File, md)) => {
                let cur = Meta::from(&md);
                let mut diff = Vec::new();
                let mut content_differs = false;
                if let Some(want_sha) = &want_sha {
                    let have = hash_file(path, &cur).map_err(|e| io_err(label, "read", e))?;
                    if &have != want_sha {
                        content_differs = true;
                        diff.push(field_diff(
                            "content",
                            format!("sha256:{have}"),
                            format!("sha256:{want_sha}"),
                        ));
                    }
                }
                want.diff(&cur, &mut diff);
                if diff.is_empty() || !enforce {
                    return Ok(Change::from_diff(diff));
                }
                if content_differs {
                    // The replacement keeps what the spec leaves out.
                    let fin = WantMeta {
                        mode: Some(want.mode.unwrap_or(cur.mode)),
                        uid: Some(want.uid.unwrap_or(cur.uid)),
                        gid: Some(want.gid.unwrap_or(cur.gid)),
                    };
                    self.write_new(path, label, &content, &fin)?;
                } else {
                    let file =
                        open_same(path, false, &cur).map_err(|e| io_err(label, "open", e))?;
                    set_meta(&file, &cur, &want).map_err(|e| io_err(label, "set metadata", e))?;
                    file.sync_all().map_err(|e| io_err(label, "fsync", e))?;
                }
                Ok(Change::from_diff(diff))
            }
            None | Some((Kind::Symlink, _)) => {
                let mut diff = vec![if found.is_none() {
                    field_diff("ensure", "absent", "present")
                } else {
                    field_diff("type", Kind::Symlink.as_str(), Kind::File.as_str())
                }];
                if let Some(s) = &want_sha {
                    diff.push(field_diff("content", "absent", format!("sha256:{s}")));
                }
                if !enforce {
                    return Ok(Change::from_diff(diff));
                }
                check_parent(path, label)?;
                let fin = WantMeta {
                    mode: Some(want.mode.unwrap_or(DEFAULT_FILE_MODE)),
                    uid: want.uid,
                    gid: want.gid,
                };
                self.write_new(path, label, &content, &fin)?;
                Ok(Change::from_diff(diff))
            }
            Some((kind, _)) => Err(ProviderError::Invalid(format!(
                "{label}: a {} stands where the file should be; refusing to replace it",
                kind.as_str()
            ))),
        }
    }

    /// Writes `content` to a temporary file beside `path`, gives it `fin`'s metadata and renames it
    /// over `path`. On any error the temporary file is removed and `path` is untouched.
    fn write_new(
        &self,
        path: &Path,
        label: &str,
        content: &Content<'_>,
        fin: &WantMeta,
    ) -> Result<(), ProviderError> {
        let dir = parent_of(path);
        let base = base_of(path, label)?;
        let (mut tmp, mut file) =
            create_temp_file(dir, base).map_err(|e| io_err(label, "create temporary file", e))?;
        match content {
            Content::Unmanaged => {}
            Content::Inline(s) => file
                .write_all(s.as_bytes())
                .map_err(|e| io_err(label, "write temporary file", e))?,
            Content::Source(src) => self.download(src, &mut file, label)?,
        }
        let tmp_meta = file
            .metadata()
            .map(|m| Meta::from(&m))
            .map_err(|e| io_err(label, "stat temporary file", e))?;
        set_meta(&file, &tmp_meta, fin).map_err(|e| io_err(label, "set metadata", e))?;
        file.sync_all()
            .map_err(|e| io_err(label, "fsync temporary file", e))?;
        drop(file);
        fs::rename(&tmp.path, path).map_err(|e| io_err(label, "rename into place", e))?;
        tmp.armed = false;
        fsync_dir(dir).map_err(|e| io_err(label, "fsync parent", e))
    }

    fn http(&self) -> &ureq::Agent {
        self.http.get_or_init(|| {
            ureq::Agent::config_builder()
                .timeout_global(Some(self.download_timeout))
                .timeout_connect(Some(CONNECT_TIMEOUT.min(self.download_timeout)))
                .timeout_per_read(Some(STALL_TIMEOUT.min(self.download_timeout)))
                .max_redirects(MAX_REDIRECTS)
                .user_agent(concat!("comodit-agent/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        })
    }

    /// Streams `src` into `out`, hashing as it goes; fails unless the sha256 matches.
    fn download(&self, src: &FileSource, out: &mut File, label: &str) -> Result<(), ProviderError> {
        let shown = redact_url(&src.url);
        let fail = |detail: String| ProviderError::Failed {
            what: format!("{label}: download of {shown}"),
            // ureq may quote the URL back (e.g. "bad uri: ..."): never let the secret parts out.
            detail: detail.replace(&src.url, &shown),
        };
        let mut resp = self
            .http()
            .get(src.url.as_str())
            .call()
            .map_err(|e| fail(e.to_string()))?;
        let max = self.max_download_bytes;
        if let Some(len) = resp.body().content_length() {
            if len > max {
                return Err(fail(format!(
                    "the server announces {len} bytes, more than the limit of {max}"
                )));
            }
        }
        // One byte over the limit is read so that "exactly at the limit" and "over" differ.
        let mut reader = resp
            .body_mut()
            .with_config()
            .limit(max.saturating_add(1))
            .reader();
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut buf = vec![0u8; IO_CHUNK_BYTES];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(fail(e.to_string())),
            };
            total += n as u64;
            if total > max {
                return Err(fail(format!("more than the limit of {max} bytes")));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| io_err(label, "write temporary file", e))?;
        }
        let got = hex::encode(hasher.finalize());
        if got != src.sha256 {
            return Err(fail(format!(
                "sha256 mismatch: expected {}, got {got} ({total} bytes); the file was left as it was",
                src.sha256
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------------------------

fn apply_dir(
    path: &Path,
    label: &str,
    spec: &DirectorySpec,
    mode: ApplyMode,
) -> Result<Change, ProviderError> {
    let enforce = mode == ApplyMode::Enforce;
    let found = lstat(path, label)?;

    if spec.ensure == Ensure::Absent {
        return match found {
            None => Ok(Change::none()),
            Some((Kind::Directory, _)) => {
                if path == Path::new("/") {
                    return Err(ProviderError::Invalid(format!(
                        "{label}: refusing to remove the root directory"
                    )));
                }
                let empty = is_empty_dir(path).map_err(|e| io_err(label, "read", e))?;
                if !empty && !spec.purge {
                    return Err(ProviderError::Invalid(format!(
                        "{label}: the directory is not empty; set purge: true to remove it with its content"
                    )));
                }
                if enforce {
                    // Both refuse to follow a symlink that replaced the directory meanwhile:
                    // rmdir fails with ENOTDIR, remove_dir_all removes only the link.
                    if empty {
                        fs::remove_dir(path).map_err(|e| io_err(label, "rmdir", e))?;
                    } else {
                        fs::remove_dir_all(path).map_err(|e| io_err(label, "purge", e))?;
                    }
                    fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
                }
                Ok(Change::from_diff(vec![field_diff(
                    "ensure", "present", "absent",
                )]))
            }
            Some((kind, _)) => Err(ProviderError::Invalid(format!(
                "{label}: a {} stands at this path, not a directory; refusing to remove it",
                kind.as_str()
            ))),
        };
    }

    let want = WantMeta::resolve(label, spec.mode, &spec.owner, &spec.group)?;
    match found {
        Some((Kind::Directory, md)) => {
            let cur = Meta::from(&md);
            let mut diff = Vec::new();
            want.diff(&cur, &mut diff);
            if diff.is_empty() || !enforce {
                return Ok(Change::from_diff(diff));
            }
            let dir = open_same(path, true, &cur).map_err(|e| io_err(label, "open", e))?;
            set_meta(&dir, &cur, &want).map_err(|e| io_err(label, "set metadata", e))?;
            dir.sync_all().map_err(|e| io_err(label, "fsync", e))?;
            Ok(Change::from_diff(diff))
        }
        None => {
            let diff = vec![field_diff("ensure", "absent", "present")];
            if !enforce {
                return Ok(Change::from_diff(diff));
            }
            check_parent(path, label)?;
            // Private until its owner and mode are set, so nobody slips a file in meanwhile.
            fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map_err(|e| io_err(label, "mkdir", e))?;
            let dir = open_nofollow(path, true).map_err(|e| io_err(label, "open", e))?;
            let cur = dir
                .metadata()
                .map(|m| Meta::from(&m))
                .map_err(|e| io_err(label, "stat", e))?;
            let fin = WantMeta {
                // A setgid bit inherited from the parent is what the parent's owner asked for.
                mode: Some(want.mode.unwrap_or(DEFAULT_DIR_MODE | (cur.mode & 0o2000))),
                uid: want.uid,
                gid: want.gid,
            };
            set_meta(&dir, &cur, &fin).map_err(|e| io_err(label, "set metadata", e))?;
            dir.sync_all().map_err(|e| io_err(label, "fsync", e))?;
            fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
            Ok(Change::from_diff(diff))
        }
        Some((kind, _)) => Err(ProviderError::Invalid(format!(
            "{label}: a {} stands where the directory should be; refusing to replace it",
            kind.as_str()
        ))),
    }
}

fn is_empty_dir(path: &Path) -> io::Result<bool> {
    Ok(fs::read_dir(path)?.next().is_none())
}

// ---------------------------------------------------------------------------------------------
// Symlinks
// ---------------------------------------------------------------------------------------------

fn apply_link(
    path: &Path,
    label: &str,
    spec: &SymlinkSpec,
    mode: ApplyMode,
) -> Result<Change, ProviderError> {
    let enforce = mode == ApplyMode::Enforce;
    let found = lstat(path, label)?;

    if spec.ensure == Ensure::Absent {
        return match found {
            None => Ok(Change::none()),
            Some((Kind::Symlink, _)) => {
                if enforce {
                    // unlink never follows the link: the target stays.
                    fs::remove_file(path).map_err(|e| io_err(label, "remove", e))?;
                    fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
                }
                Ok(Change::from_diff(vec![field_diff(
                    "ensure", "present", "absent",
                )]))
            }
            Some((kind, _)) => Err(ProviderError::Invalid(format!(
                "{label}: a {} stands at this path, not a symlink; refusing to remove it",
                kind.as_str()
            ))),
        };
    }

    let target = spec.target.as_deref().ok_or_else(|| {
        ProviderError::Invalid(format!("{label}: target is required with ensure: present"))
    })?;
    let replaced = |kind: Kind| {
        vec![
            field_diff("type", kind.as_str(), Kind::Symlink.as_str()),
            field_diff("target", "absent", target),
        ]
    };
    let refuse = |kind: Kind, why: &str| {
        Err(ProviderError::Invalid(format!(
            "{label}: a {} stands where the symlink should be; {why}",
            kind.as_str()
        )))
    };

    match found {
        None => {
            let diff = vec![
                field_diff("ensure", "absent", "present"),
                field_diff("target", "absent", target),
            ];
            if enforce {
                check_parent(path, label)?;
                // symlink(2) fails with EEXIST if something appeared meanwhile: nothing is lost.
                std::os::unix::fs::symlink(target, path)
                    .map_err(|e| io_err(label, "symlink", e))?;
                fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
            }
            Ok(Change::from_diff(diff))
        }
        Some((Kind::Symlink, _)) => {
            let cur = fs::read_link(path).map_err(|e| io_err(label, "readlink", e))?;
            if cur.as_os_str().as_bytes() == target.as_bytes() {
                return Ok(Change::none());
            }
            let diff = vec![field_diff("target", cur.to_string_lossy(), target)];
            if enforce {
                replace_with_link(path, label, target)?;
            }
            Ok(Change::from_diff(diff))
        }
        Some((Kind::File, _)) => {
            if !spec.force {
                return refuse(Kind::File, "set force: true to replace it");
            }
            if enforce {
                replace_with_link(path, label, target)?;
            }
            Ok(Change::from_diff(replaced(Kind::File)))
        }
        Some((Kind::Directory, _)) => {
            if !spec.force {
                return refuse(
                    Kind::Directory,
                    "set force: true to replace it if it is empty",
                );
            }
            if !is_empty_dir(path).map_err(|e| io_err(label, "read", e))? {
                return refuse(
                    Kind::Directory,
                    "it is not empty, and a symlink never replaces a non-empty directory",
                );
            }
            if enforce {
                // rename(2) cannot put a link over a directory: remove it first (two steps).
                fs::remove_dir(path).map_err(|e| io_err(label, "rmdir", e))?;
                std::os::unix::fs::symlink(target, path)
                    .map_err(|e| io_err(label, "symlink", e))?;
                fsync_dir(parent_of(path)).map_err(|e| io_err(label, "fsync parent", e))?;
            }
            Ok(Change::from_diff(replaced(Kind::Directory)))
        }
        Some((kind, _)) => refuse(kind, "refusing to replace it"),
    }
}

/// Makes `path` a symlink to `target` in one step: a temporary link renamed over it.
fn replace_with_link(path: &Path, label: &str, target: &str) -> Result<(), ProviderError> {
    let dir = parent_of(path);
    let base = base_of(path, label)?;
    let mut tmp = None;
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let candidate = temp_name(dir, base);
        match std::os::unix::fs::symlink(target, &candidate) {
            Ok(()) => {
                tmp = Some(TempPath {
                    path: candidate,
                    armed: true,
                });
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(label, "create temporary symlink", e)),
        }
    }
    let mut tmp = tmp.ok_or_else(|| {
        io_err(
            label,
            "create temporary symlink",
            io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"),
        )
    })?;
    fs::rename(&tmp.path, path).map_err(|e| io_err(label, "rename into place", e))?;
    tmp.armed = false;
    fsync_dir(dir).map_err(|e| io_err(label, "fsync parent", e))
}

// ---------------------------------------------------------------------------------------------
// Shared: paths, kinds, metadata, temporary names, owners
// ---------------------------------------------------------------------------------------------

/// What stands at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    BlockDevice,
    CharDevice,
}

impl Kind {
    fn of(ft: fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Directory
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_block_device() {
            Kind::BlockDevice
        } else {
            Kind::CharDevice
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Directory => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::BlockDevice => "block device",
            Kind::CharDevice => "character device",
        }
    }
}

/// The metadata providers compare and set.
#[derive(Clone, Copy, Debug)]
struct Meta {
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    mode: u32,
    uid: u32,
    gid: u32,
    dev: u64,
    ino: u64,
    size: u64,
}

impl From<&Metadata> for Meta {
    fn from(m: &Metadata) -> Self {
        Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
        }
    }
}

/// Metadata a spec asks for, owners resolved to ids; `None` leaves the field as it is.
#[derive(Clone, Copy, Debug, Default)]
struct WantMeta {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

impl WantMeta {
    fn resolve(
        label: &str,
        mode: Option<Mode>,
        owner: &Option<String>,
        group: &Option<String>,
    ) -> Result<Self, ProviderError> {
        Ok(WantMeta {
            mode: mode.map(|m| m.0),
            uid: owner
                .as_deref()
                .map(|o| resolve_id(label, Db::User, o))
                .transpose()?,
            gid: group
                .as_deref()
                .map(|g| resolve_id(label, Db::Group, g))
                .transpose()?,
        })
    }

    fn diff(&self, cur: &Meta, out: &mut Vec<FieldDiff>) {
        if let Some(m) = self.mode.filter(|m| *m != cur.mode) {
            out.push(field_diff(
                "mode",
                Mode(cur.mode).to_string(),
                Mode(m).to_string(),
            ));
        }
        if let Some(u) = self.uid.filter(|u| *u != cur.uid) {
            out.push(field_diff("owner", user_label(cur.uid), user_label(u)));
        }
        if let Some(g) = self.gid.filter(|g| *g != cur.gid) {
            out.push(field_diff("group", group_label(cur.gid), group_label(g)));
        }
    }
}

/// Sets `want` on an open file or directory whose metadata is `cur`. Owner first: `chown` clears
/// setuid/setgid, so the mode is (re)applied after it.
fn set_meta(file: &File, cur: &Meta, want: &WantMeta) -> io::Result<()> {
    let uid = want.uid.filter(|u| *u != cur.uid);
    let gid = want.gid.filter(|g| *g != cur.gid);
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(file, uid, gid)?;
    }
    let mode = want.mode.unwrap_or(cur.mode);
    let now = file.metadata()?.mode() & 0o7777;
    if now != mode {
        file.set_permissions(Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Checks the id is an absolute normalized path (a caller could hand over an id of another
/// collection) and builds the label errors start with (`files /etc/motd`).
fn resource_path(coll: Collection, id: &ResourceId) -> Result<(&Path, String), ProviderError> {
    let label = format!("{coll} {id}");
    validate_abs_path("id", id.as_str())
        .map_err(|e| ProviderError::Invalid(format!("{label}: {e}")))?;
    Ok((Path::new(id.as_str()), label))
}

fn wrong_spec(label: &str, spec: &Spec) -> ProviderError {
    ProviderError::Invalid(format!(
        "{label}: got a spec for collection {}",
        spec.collection()
    ))
}

fn io_err(label: &str, action: &str, e: io::Error) -> ProviderError {
    ProviderError::io(format!("{label}: {action}"), e)
}

/// What stands at `path`, never following a symlink there.
fn lstat(path: &Path, label: &str) -> Result<Option<(Kind, Metadata)>, ProviderError> {
    match fs::symlink_metadata(path) {
        Ok(md) => Ok(Some((Kind::of(md.file_type()), md))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        // A parent component is not a directory: nothing can exist at this path.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(io_err(label, "lstat", e)),
    }
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("/"))
}

fn base_of<'a>(path: &'a Path, label: &str) -> Result<&'a OsStr, ProviderError> {
    path.file_name()
        .ok_or_else(|| ProviderError::Invalid(format!("{label}: the path has no file name")))
}

/// The parent must be an existing directory (reached through symlinks or not): parents are never
/// created implicitly.
fn check_parent(path: &Path, label: &str) -> Result<(), ProviderError> {
    let parent = parent_of(path);
    match fs::metadata(parent) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(ProviderError::Invalid(format!(
            "{label}: the parent {} is not a directory",
            parent.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProviderError::Invalid(format!(
            "{label}: the parent directory {} does not exist (parents are not created implicitly)",
            parent.display()
        ))),
        Err(e) => Err(io_err(label, "stat parent", e)),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Opens `path` for reading metadata and content without following a symlink there and without
/// blocking on a FIFO that replaced a file.
fn open_nofollow(path: &Path, dir: bool) -> io::Result<File> {
    let extra = if dir {
        libc::O_DIRECTORY
    } else {
        libc::O_NONBLOCK
    };
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | extra)
        .open(path)
}

/// Opens `path` and checks it is still the object `expected` was read from.
fn open_same(path: &Path, dir: bool, expected: &Meta) -> io::Result<File> {
    let file = open_nofollow(path, dir)?;
    let md = file.metadata()?;
    if md.dev() != expected.dev || md.ino() != expected.ino {
        return Err(io::Error::other(
            "the path was replaced while being applied",
        ));
    }
    Ok(file)
}

fn hash_file(path: &Path, expected: &Meta) -> io::Result<String> {
    let mut file = open_same(path, false, expected)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; IO_CHUNK_BYTES];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

const TEMP_NAME_ATTEMPTS: usize = 16;

/// A temporary path removed on drop unless disarmed (after the rename that consumed it).
struct TempPath {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `.<name>.comodit-<16 hex>` in `dir`; the name part is cut so the whole stays under NAME_MAX.
fn temp_name(dir: &Path, base: &OsStr) -> PathBuf {
    let b = base.as_bytes();
    let b = &b[..b.len().min(200)];
    let mut name = Vec::with_capacity(b.len() + 27);
    name.push(b'.');
    name.extend_from_slice(b);
    name.extend_from_slice(format!(".comodit-{:016x}", rand::random::<u64>()).as_bytes());
    dir.join(OsStr::from_bytes(&name))
}

fn create_temp_file(dir: &Path, base: &OsStr) -> io::Result<(TempPath, File)> {
    for _ in 0..TEMP_NAME_ATTEMPTS {
        let path = temp_name(dir, base);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok((TempPath { path, armed: true }, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

/// The entries directly under `under` of one kind, as full paths, sorted. Names that cannot be
/// ids (not UTF-8, too long) are skipped: nothing could address them anyway.
fn list_kind(
    coll: Collection,
    under: Option<&str>,
    want: Kind,
) -> Result<Vec<String>, ProviderError> {
    let dir = under.ok_or_else(|| {
        ProviderError::Invalid(format!("{coll}: list needs the directory to list (under)"))
    })?;
    validate_abs_path("under", dir).map_err(|e| ProviderError::Invalid(format!("{coll}: {e}")))?;
    let label = format!("{coll} under {dir}");
    let entries = fs::read_dir(dir).map_err(|e| io_err(&label, "read directory", e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err(&label, "read directory", e))?;
        // DirEntry::file_type does not follow symlinks.
        let ft = entry
            .file_type()
            .map_err(|e| io_err(&label, "read directory", e))?;
        if Kind::of(ft) != want {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let full = if dir == "/" {
            format!("/{name}")
        } else {
            format!("{dir}/{name}")
        };
        if ResourceId::parse(coll, &full).is_err() {
            continue;
        }
        if out.len() == MAX_LIST_ENTRIES {
            return Err(ProviderError::Invalid(format!(
                "{label}: more than {MAX_LIST_ENTRIES} entries; list a narrower directory"
            )));
        }
        out.push(full);
    }
    out.sort();
    Ok(out)
}

/// `https://user:pw@host/p?sig=…` → `https://<redacted>@host/p?<redacted>`.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (before_query, has_query) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    let (authority, path) =
        before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
    let mut out = String::with_capacity(url.len());
    if !scheme.is_empty() {
        out.push_str(scheme);
        out.push_str("://");
    }
    match authority.rsplit_once('@') {
        Some((_, host)) => {
            out.push_str("<redacted>@");
            out.push_str(host);
        }
        None => out.push_str(authority),
    }
    out.push_str(path);
    if has_query {
        out.push_str("?<redacted>");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Users and groups (NSS through libc, so LDAP/sssd users resolve as they do for `ls`)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Db {
    User,
    Group,
}

/// An owner or group as written in a spec: all digits is an id (taken as is, even if no name maps
/// to it), anything else a name that must exist.
fn resolve_id(label: &str, db: Db, value: &str) -> Result<u32, ProviderError> {
    let (field, what) = match db {
        Db::User => ("owner", "user"),
        Db::Group => ("group", "group"),
    };
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // u32::MAX is chown's "leave unchanged", never a real id.
        return match value.parse::<u32>() {
            Ok(id) if id != u32::MAX => Ok(id),
            _ => Err(ProviderError::Invalid(format!(
                "{label}: {field} {value:?} is not a valid {what} id"
            ))),
        };
    }
    let found = match db {
        Db::User => uid_by_name(value),
        Db::Group => gid_by_name(value),
    };
    match found {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(ProviderError::Invalid(format!(
            "{label}: {field} {value:?}: no such {what} on this host"
        ))),
        Err(e) => Err(io_err(label, &format!("look up {what} {value:?}"), e)),
    }
}

fn user_label(uid: u32) -> String {
    user_name(uid)
        .ok()
        .flatten()
        .unwrap_or_else(|| uid.to_string())
}

fn group_label(gid: u32) -> String {
    group_name(gid)
        .ok()
        .flatten()
        .unwrap_or_else(|| gid.to_string())
}

/// Calls a reentrant NSS function with a buffer, growing it on `ERANGE` up to a bound.
fn nss_call<T>(
    mut f: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut size = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        let (rc, out) = f(&mut buf);
        match rc {
            0 => return Ok(out),
            // POSIX allows these for "no such entry".
            libc::ENOENT | libc::ESRCH => return Ok(None),
            libc::ERANGE if size < MAX_NSS_BUF_BYTES => size *= 2,
            rc => return Err(io::Error::from_raw_os_error(rc)),
        }
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

fn uid_by_name(name: &str) -> io::Result<Option<u32>> {
    let c = c_name(name)?;
    nss_call(|buf| {
        // SAFETY: all pointers are valid for the call; `pwd` is only read when `res` is non-null,
        // i.e. when the call filled it.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut res: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc, (!res.is_null()).then_some(pwd.pw_uid))
        }
    })
}

fn gid_by_name(name: &str) -> io::Result<Option<u32>> {
    let c = c_name(name)?;
    nss_call(|buf| {
        // SAFETY: as in `uid_by_name`.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut res: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc, (!res.is_null()).then_some(grp.gr_gid))
        }
    })
}

fn user_name(uid: u32) -> io::Result<Option<String>> {
    nss_call(|buf| {
        // SAFETY: as in `uid_by_name`; `pw_name` points into `buf`, copied out before it is freed.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut res: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res);
            let name = (!res.is_null() && !pwd.pw_name.is_null())
                .then(|| CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned());
            (rc, name)
        }
    })
}

fn group_name(gid: u32) -> io::Result<Option<String>> {
    nss_call(|buf| {
        // SAFETY: as in `user_name`.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut res: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut res);
            let name = (!res.is_null() && !grp.gr_name.is_null())
                .then(|| CStr::from_ptr(grp.gr_name).to_string_lossy().into_owned());
            (rc, name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    use serde_json::json;

    const DRY: ApplyMode = ApplyMode::DryRun;
    const ENFORCE: ApplyMode = ApplyMode::Enforce;

    // daemon (1) and bin (2) exist on every Debian/RHEL-like host, as users and as groups.
    const DAEMON: u32 = 1;
    const BIN: u32 = 2;

    fn id(coll: Collection, p: &Path) -> ResourceId {
        ResourceId::parse(coll, p.to_str().unwrap()).unwrap()
    }

    fn spec(coll: Collection, v: Value) -> Spec {
        Spec::from_json(coll, v).unwrap()
    }

    fn sha(s: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(s)))
    }

    fn d(field: &str, from: impl Into<Value>, to: impl Into<Value>) -> FieldDiff {
        field_diff(field, from, to)
    }

    fn meta(p: &Path) -> Metadata {
        fs::symlink_metadata(p).unwrap()
    }

    fn mode_of(p: &Path) -> u32 {
        meta(p).mode() & 0o7777
    }

    /// Everything observable in a directory tree (names, kinds, modes, owners, inodes, sizes,
    /// mtimes, content, link targets), to prove a dry run or a refused apply changed nothing.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = meta(&p);
                let extra = match Kind::of(m.file_type()) {
                    Kind::File => sha(&fs::read(&p).unwrap()),
                    Kind::Symlink => fs::read_link(&p).unwrap().display().to_string(),
                    Kind::Directory => {
                        stack.push(p.clone());
                        String::new()
                    }
                    _ => String::new(),
                };
                let line = format!(
                    "{:?} {:o} {}:{} ino={} size={} mtime={}.{} {extra}",
                    Kind::of(m.file_type()),
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.ino(),
                    m.size(),
                    m.mtime(),
                    m.mtime_nsec()
                );
                out.insert(p, line);
            }
        }
        out
    }

    fn no_temp_files(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().contains(".comodit-"),
                "temporary file left behind: {name:?}"
            );
        }
    }

    fn invalid(r: Result<Change, ProviderError>) -> String {
        match r {
            Err(ProviderError::Invalid(m)) => m,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    // -- files ------------------------------------------------------------------------------

    #[test]
    fn file_create_then_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("motd");
        let p = FileProvider::new();
        let rid = id(Collection::Files, &path);
        let s = spec(
            Collection::Files,
            json!({"content": "hello\n", "mode": "0640", "owner": "daemon", "group": "bin"}),
        );

        let c = p.apply(&rid, &s, ENFORCE).unwrap();
        assert!(c.changed);
        assert_eq!(
            c.diff,
            vec![
                d("ensure", "absent", "present"),
                d("content", "absent", sha(b"hello\n"))
            ]
        );
        assert_eq!(fs::read(&path).unwrap(), b"hello\n");
        let m = meta(&path);
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.uid(), m.gid()), (DAEMON, BIN));
        no_temp_files(tmp.path());

        let again = p.apply(&rid, &s, ENFORCE).unwrap();
        assert_eq!(again, Change::none());
        assert_eq!(p.apply(&rid, &s, DRY).unwrap(), Change::none());

        assert_eq!(
            p.read(&rid).unwrap(),
            json!({"ensure": "present", "mode": "0640", "owner": "daemon", "group": "bin",
                   "sha256": hex::encode(Sha256::digest(b"hello\n")), "size": 6})
        );
    }

    #[test]
    fn file_new_without_mode_is_0644_and_empty_without_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("empty");
        let p = FileProvider::new();
        let rid = id(Collection::Files, &path);
        let c = p
            .apply(&rid, &spec(Collection::Files, json!({})), ENFORCE)
            .unwrap();
        assert_eq!(c.diff, vec![d("ensure", "absent", "present")]);
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert_eq!(mode_of(&path), 0o644);

        // Metadata-only spec on an existing file: content untouched.
        fs::write(&path, "keep me").unwrap();
        let c = p
            .apply(
                &rid,
                &spec(Collection::Files, json!({"mode": "0600"})),
                ENFORCE,
            )
            .unwrap();
        assert_eq!(c.diff, vec![d("mode", "0644", "0600")]);
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
        assert_eq!(mode_of(&path), 0o600);
    }

    #[test]
    fn file_dry_run_on_missing_and_different_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();

        let missing = tmp.path().join("missing");
        let s = spec(
            Collection::Files,
            json!({"content": "x", "mode": "0600", "owner": "daemon"}),
        );
        let before = snapshot(tmp.path());
        let c = p.apply(&id(Collection::Files, &missing), &s, DRY).unwrap();
        assert!(c.changed);
        assert_eq!(
            c.diff,
            vec![
                d("ensure", "absent", "present"),
                d("content", "absent", sha(b"x"))
            ]
        );
        assert_eq!(snapshot(tmp.path()), before);

        let path = tmp.path().join("f");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let before = snapshot(tmp.path());
        let s = spec(
            Collection::Files,
            json!({"content": "new", "mode": "0600", "owner": "daemon", "group": "bin"}),
        );
        let c = p.apply(&id(Collection::Files, &path), &s, DRY).unwrap();
        assert_eq!(
            c.diff,
            vec![
                d("content", sha(b"old"), sha(b"new")),
                d("mode", "0644", "0600"),
                d("owner", "root", "daemon"),
                d("group", "root", "bin"),
            ]
        );
        assert_eq!(snapshot(tmp.path()), before);

        // Enforce yields the same diff, then nothing is left to do.
        let e = p.apply(&id(Collection::Files, &path), &s, ENFORCE).unwrap();
        assert_eq!(e, c);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            p.apply(&id(Collection::Files, &path), &s, DRY).unwrap(),
            Change::none()
        );
    }

    #[test]
    fn file_metadata_only_fix_keeps_inode_and_content() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        fs::write(&path, "same").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        let before = meta(&path);
        let p = FileProvider::new();
        let s = spec(
            Collection::Files,
            json!({"content": "same", "mode": "0640", "owner": "1", "group": "2"}),
        );
        let c = p.apply(&id(Collection::Files, &path), &s, ENFORCE).unwrap();
        assert_eq!(
            c.diff,
            vec![
                d("mode", "0666", "0640"),
                d("owner", "root", "daemon"),
                d("group", "root", "bin")
            ]
        );
        let after = meta(&path);
        assert_eq!(after.ino(), before.ino(), "content must not be rewritten");
        assert_eq!(
            (after.mtime(), after.mtime_nsec()),
            (before.mtime(), before.mtime_nsec())
        );
        assert_eq!(
            (after.mode() & 0o7777, after.uid(), after.gid()),
            (0o640, DAEMON, BIN)
        );
        assert_eq!(fs::read(&path).unwrap(), b"same");
    }

    #[test]
    fn file_content_change_replaces_atomically_and_keeps_unmanaged_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&path, Some(DAEMON), Some(BIN)).unwrap();
        let old_ino = meta(&path).ino();
        let p = FileProvider::new();
        let c = p
            .apply(
                &id(Collection::Files, &path),
                &spec(Collection::Files, json!({"content": "new"})),
                ENFORCE,
            )
            .unwrap();
        assert_eq!(c.diff, vec![d("content", sha(b"old"), sha(b"new"))]);
        let m = meta(&path);
        assert_ne!(m.ino(), old_ino, "new content goes through a rename");
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, DAEMON, BIN));
        assert_eq!(fs::read(&path).unwrap(), b"new");
        no_temp_files(tmp.path());
    }

    #[test]
    fn file_special_bits_survive_chown() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        // Setuid with a new owner: chown must come before chmod.
        let a = tmp.path().join("suid");
        let s = spec(
            Collection::Files,
            json!({"content": "#!/bin/true\n", "mode": "4755", "owner": "daemon"}),
        );
        p.apply(&id(Collection::Files, &a), &s, ENFORCE).unwrap();
        assert_eq!(mode_of(&a), 0o4755);
        assert_eq!(meta(&a).uid(), DAEMON);
        assert_eq!(
            p.apply(&id(Collection::Files, &a), &s, DRY).unwrap(),
            Change::none()
        );

        // Only the owner changes: the setgid+setuid mode the spec does not manage is kept.
        let b = tmp.path().join("keep");
        fs::write(&b, "x").unwrap();
        fs::set_permissions(&b, Permissions::from_mode(0o6755)).unwrap();
        p.apply(
            &id(Collection::Files, &b),
            &spec(
                Collection::Files,
                json!({"owner": "daemon", "group": "bin"}),
            ),
            ENFORCE,
        )
        .unwrap();
        assert_eq!((meta(&b).uid(), meta(&b).gid()), (DAEMON, BIN));
        assert_eq!(mode_of(&b), 0o6755);
    }

    #[test]
    fn file_absent_removes_file_or_link_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let path = tmp.path().join("f");
        fs::write(&path, "x").unwrap();
        let rid = id(Collection::Files, &path);
        let absent = spec(Collection::Files, json!({"ensure": "absent"}));

        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &absent, DRY).unwrap();
        assert_eq!(c.diff, vec![d("ensure", "present", "absent")]);
        assert_eq!(snapshot(tmp.path()), before);

        assert_eq!(p.apply(&rid, &absent, ENFORCE).unwrap(), c);
        assert!(!path.exists());
        assert_eq!(p.apply(&rid, &absent, ENFORCE).unwrap(), Change::none());
        assert_eq!(p.read(&rid).unwrap(), json!({"ensure": "absent"}));

        // A symlink is removed, its target stays.
        let target = tmp.path().join("target");
        fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(p.apply(&rid, &absent, ENFORCE).unwrap().changed);
        assert!(fs::symlink_metadata(&path).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn file_refuses_directory_or_fifo_at_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("inside"), "precious").unwrap();
        let rid = id(Collection::Files, &dir);
        let before = snapshot(tmp.path());
        for (s, mode) in [
            (json!({"content": "x"}), ENFORCE),
            (json!({"content": "x"}), DRY),
            (json!({"mode": "0600"}), ENFORCE),
            (json!({"ensure": "absent"}), ENFORCE),
        ] {
            let msg = invalid(p.apply(&rid, &spec(Collection::Files, s), mode));
            assert!(
                msg.contains("directory") && msg.contains(dir.to_str().unwrap()),
                "{msg}"
            );
        }
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(
            p.read(&rid).unwrap(),
            json!({"ensure": "absent", "type": "directory"})
        );

        let fifo = tmp.path().join("fifo");
        let c = CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let msg = invalid(p.apply(
            &id(Collection::Files, &fifo),
            &spec(Collection::Files, json!({"content": "x"})),
            ENFORCE,
        ));
        assert!(msg.contains("fifo"), "{msg}");
        assert_eq!(Kind::of(meta(&fifo).file_type()), Kind::Fifo);
    }

    #[test]
    fn file_replaces_a_symlink_without_touching_its_target() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let target = tmp.path().join("target");
        fs::write(&target, "secret").unwrap();
        fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();
        let path = tmp.path().join("f");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let rid = id(Collection::Files, &path);
        let s = spec(
            Collection::Files,
            json!({"content": "public", "mode": "0644", "owner": "daemon"}),
        );

        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &s, DRY).unwrap();
        assert_eq!(
            c.diff,
            vec![
                d("type", "symlink", "file"),
                d("content", "absent", sha(b"public"))
            ]
        );
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(
            p.read(&rid).unwrap(),
            json!({"ensure": "absent", "type": "symlink"})
        );

        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), c);
        assert!(meta(&path).file_type().is_file());
        assert_eq!(fs::read(&path).unwrap(), b"public");
        let t = meta(&target);
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        assert_eq!((t.mode() & 0o7777, t.uid()), (0o600, 0));
        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), Change::none());
    }

    #[test]
    fn file_needs_its_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let path = tmp.path().join("nope").join("f");
        let rid = id(Collection::Files, &path);
        let s = spec(Collection::Files, json!({"content": "x"}));
        // Dry run: an earlier resource may create the parent, so it reports the creation.
        let c = p.apply(&rid, &s, DRY).unwrap();
        assert_eq!(c.diff[0], d("ensure", "absent", "present"));
        let msg = invalid(p.apply(&rid, &s, ENFORCE));
        assert!(
            msg.contains("parent directory") && msg.contains("does not exist"),
            "{msg}"
        );
        assert!(!tmp.path().join("nope").exists());

        // A file where the parent should be: absent is already true, present fails clearly.
        let blocker = tmp.path().join("blocker");
        fs::write(&blocker, "x").unwrap();
        let rid = id(Collection::Files, &blocker.join("f"));
        assert_eq!(p.read(&rid).unwrap(), json!({"ensure": "absent"}));
        let absent = spec(Collection::Files, json!({"ensure": "absent"}));
        assert_eq!(p.apply(&rid, &absent, ENFORCE).unwrap(), Change::none());
        let msg = invalid(p.apply(&rid, &s, ENFORCE));
        assert!(msg.contains("is not a directory"), "{msg}");
        assert_eq!(fs::read(&blocker).unwrap(), b"x");
    }

    #[test]
    fn file_drift_is_detected_by_dry_run() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let path = tmp.path().join("conf");
        let rid = id(Collection::Files, &path);
        let s = spec(
            Collection::Files,
            json!({"content": "a=1\n", "mode": "0644"}),
        );
        p.apply(&rid, &s, ENFORCE).unwrap();
        assert_eq!(p.apply(&rid, &s, DRY).unwrap(), Change::none());

        fs::write(&path, "a=2\n").unwrap();
        assert_eq!(
            p.apply(&rid, &s, DRY).unwrap().diff,
            vec![d("content", sha(b"a=2\n"), sha(b"a=1\n"))]
        );
        p.apply(&rid, &s, ENFORCE).unwrap();

        fs::set_permissions(&path, Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            p.apply(&rid, &s, DRY).unwrap().diff,
            vec![d("mode", "0777", "0644")]
        );
        p.apply(&rid, &s, ENFORCE).unwrap();

        std::os::unix::fs::chown(&path, Some(DAEMON), None).unwrap();
        let owned = spec(
            Collection::Files,
            json!({"content": "a=1\n", "owner": "root"}),
        );
        assert_eq!(
            p.apply(&rid, &owned, DRY).unwrap().diff,
            vec![d("owner", "daemon", "root")]
        );

        fs::remove_file(&path).unwrap();
        assert_eq!(
            p.apply(&rid, &s, DRY).unwrap().diff,
            vec![
                d("ensure", "absent", "present"),
                d("content", "absent", sha(b"a=1\n"))
            ]
        );
        assert!(!path.exists());
    }

    #[test]
    fn owners_by_name_and_number() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let path = tmp.path().join("f");
        let rid = id(Collection::Files, &path);
        p.apply(
            &rid,
            &spec(Collection::Files, json!({"owner": "1", "group": "2"})),
            ENFORCE,
        )
        .unwrap();
        assert_eq!((meta(&path).uid(), meta(&path).gid()), (DAEMON, BIN));
        // The same ids by name: nothing to do.
        assert_eq!(
            p.apply(
                &rid,
                &spec(
                    Collection::Files,
                    json!({"owner": "daemon", "group": "bin"})
                ),
                DRY
            )
            .unwrap(),
            Change::none()
        );
        // An id no name maps to is taken as is and shown as a number.
        let c = p
            .apply(
                &rid,
                &spec(
                    Collection::Files,
                    json!({"owner": "54321", "group": "54322"}),
                ),
                ENFORCE,
            )
            .unwrap();
        assert_eq!(
            c.diff,
            vec![d("owner", "daemon", "54321"), d("group", "bin", "54322")]
        );
        assert_eq!((meta(&path).uid(), meta(&path).gid()), (54321, 54322));
        let r = p.read(&rid).unwrap();
        assert_eq!(
            (r["owner"].as_str(), r["group"].as_str()),
            (Some("54321"), Some("54322"))
        );
    }

    #[test]
    fn unknown_owner_or_group_is_a_clear_error_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let path = tmp.path().join("f");
        let rid = id(Collection::Files, &path);
        for mode in [DRY, ENFORCE] {
            let msg = invalid(p.apply(
                &rid,
                &spec(
                    Collection::Files,
                    json!({"content": "x", "owner": "nosuchuser_zz"}),
                ),
                mode,
            ));
            assert!(
                msg.contains("owner \"nosuchuser_zz\"") && msg.contains("no such user"),
                "{msg}"
            );
            assert!(
                msg.starts_with(&format!("files {}", path.display())),
                "{msg}"
            );
            let msg = invalid(p.apply(
                &rid,
                &spec(
                    Collection::Files,
                    json!({"content": "x", "group": "nosuchgroup_zz"}),
                ),
                mode,
            ));
            assert!(msg.contains("no such group"), "{msg}");
        }
        assert!(!path.exists());
        let msg = invalid(DirectoryProvider::new().apply(
            &id(Collection::Directories, &path),
            &spec(Collection::Directories, json!({"owner": "nosuchuser_zz"})),
            ENFORCE,
        ));
        assert!(msg.contains("no such user"), "{msg}");
        assert!(!path.exists());
        // 4294967295 is chown's "unchanged", not an id.
        let msg = invalid(p.apply(
            &rid,
            &spec(Collection::Files, json!({"owner": "4294967295"})),
            ENFORCE,
        ));
        assert!(msg.contains("not a valid user id"), "{msg}");
    }

    #[test]
    fn wrong_spec_kind_and_non_path_ids_are_refused() {
        let p = FileProvider::new();
        let rid = ResourceId::parse(Collection::Files, "/tmp/x").unwrap();
        let msg = invalid(p.apply(&rid, &spec(Collection::Directories, json!({})), DRY));
        assert!(msg.contains("directories"), "{msg}");
        let pkg = ResourceId::parse(Collection::Packages, "nginx").unwrap();
        assert!(matches!(p.read(&pkg), Err(ProviderError::Invalid(_))));
        assert!(matches!(
            p.apply(&pkg, &spec(Collection::Files, json!({})), DRY),
            Err(ProviderError::Invalid(_))
        ));
    }

    #[test]
    fn lists_each_kind_under_a_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join("b"), "").unwrap();
        fs::write(root.join("a"), "").unwrap();
        fs::create_dir(root.join("dir2")).unwrap();
        fs::create_dir(root.join("dir1")).unwrap();
        fs::write(root.join("dir1/nested"), "").unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("link-to-file")).unwrap();
        std::os::unix::fs::symlink(root.join("dir1"), root.join("link-to-dir")).unwrap();
        let under = root.to_str().unwrap();
        let full = |names: &[&str]| {
            names
                .iter()
                .map(|n| format!("{under}/{n}"))
                .collect::<Vec<_>>()
        };

        assert_eq!(
            FileProvider::new().list(Some(under)).unwrap(),
            full(&["a", "b"])
        );
        assert_eq!(
            DirectoryProvider::new().list(Some(under)).unwrap(),
            full(&["dir1", "dir2"])
        );
        assert_eq!(
            SymlinkProvider::new().list(Some(under)).unwrap(),
            full(&["link-to-dir", "link-to-file"])
        );
        for r in [
            FileProvider::new().list(None),
            DirectoryProvider::new().list(None),
            SymlinkProvider::new().list(None),
            FileProvider::new().list(Some("relative/dir")),
            FileProvider::new().list(Some("/a/../b")),
        ] {
            assert!(matches!(r, Err(ProviderError::Invalid(_))), "{r:?}");
        }
        assert!(DirectoryProvider::new()
            .list(Some("/"))
            .unwrap()
            .contains(&"/tmp".to_owned()));
    }

    #[test]
    fn thousand_files_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let p = FileProvider::new();
        let items: Vec<(ResourceId, Spec, String)> = (0..1000)
            .map(|i| {
                let path = tmp.path().join(format!("f{i:04}"));
                let content = format!("file number {i}\n");
                let s = spec(
                    Collection::Files,
                    json!({"content": content, "mode": "0640", "owner": "root"}),
                );
                (id(Collection::Files, &path), s, content)
            })
            .collect();

        let t = Instant::now();
        for (rid, s, _) in &items {
            assert!(p.apply(rid, s, ENFORCE).unwrap().changed);
        }
        let first = t.elapsed();
        let t = Instant::now();
        for (rid, s, _) in &items {
            assert_eq!(p.apply(rid, s, ENFORCE).unwrap(), Change::none());
        }
        let second = t.elapsed();
        eprintln!("1000 files: first apply {first:?}, second (no-op) apply {second:?}");

        for (rid, _, content) in &items {
            assert_eq!(fs::read_to_string(rid.as_str()).unwrap(), *content);
            assert_eq!(mode_of(Path::new(rid.as_str())), 0o640);
        }
        assert_eq!(
            p.list(Some(tmp.path().to_str().unwrap())).unwrap().len(),
            1000
        );
    }

    // -- source downloads ------------------------------------------------------------------------

    enum Reply {
        /// `/file` answers 200 with this body; any other path 404.
        Body(Vec<u8>),
        /// `/file` answers 200 with this body, without Content-Length: it ends when the
        /// connection closes, so only counting the bytes can enforce the limit.
        Unsized(Vec<u8>),
        /// Reads the request, then says nothing until the client gives up.
        Stall,
    }

    /// A loopback HTTP/1.1 server that counts requests. Dropping it stops its thread.
    struct TestServer {
        addr: SocketAddr,
        hits: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl TestServer {
        fn start(reply: Reply) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let (h, s) = (hits.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    // Bounded: a confused client cannot keep the test thread forever.
                    conn.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut first = String::new();
                    if reader.read_line(&mut first).unwrap_or(0) == 0 {
                        continue;
                    }
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => break,
                            Ok(_) if line == "\r\n" => break,
                            Ok(_) => {}
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let path = first.split_whitespace().nth(1).unwrap_or("").to_owned();
                    match &reply {
                        Reply::Body(body) if path == "/file" => {
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            );
                            let _ = conn.write_all(head.as_bytes());
                            let _ = conn.write_all(body);
                        }
                        Reply::Unsized(body) if path == "/file" => {
                            let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
                            let _ = conn.write_all(head.as_bytes());
                            let _ = conn.write_all(body);
                        }
                        Reply::Body(_) | Reply::Unsized(_) => {
                            let _ = conn.write_all(
                                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                        }
                        Reply::Stall => {
                            let _ = reader.read(&mut [0u8; 1]);
                        }
                    }
                }
            });
            TestServer {
                addr,
                hits,
                stop,
                thread: Some(thread),
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn source(url: &str, body: &[u8]) -> Spec {
        spec(
            Collection::Files,
            json!({"source": {"url": url, "sha256": hex::encode(Sha256::digest(body))}, "mode": "0600"}),
        )
    }

    #[test]
    fn source_download_with_right_sha() {
        let body = b"downloaded content\n".repeat(10_000);
        let server = TestServer::start(Reply::Body(body.clone()));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big");
        let rid = id(Collection::Files, &path);
        let p = FileProvider::new();
        let s = source(&server.url("/file"), &body);

        let c = p.apply(&rid, &s, ENFORCE).unwrap();
        assert_eq!(
            c.diff,
            vec![
                d("ensure", "absent", "present"),
                d("content", "absent", sha(&body))
            ]
        );
        assert_eq!(fs::read(&path).unwrap(), body);
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(server.hits(), 1);
        no_temp_files(tmp.path());

        // Already has that sha256: no request at all.
        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), Change::none());
        assert_eq!(p.apply(&rid, &s, DRY).unwrap(), Change::none());
        assert_eq!(server.hits(), 1);
    }

    #[test]
    fn source_with_wrong_sha_or_error_leaves_the_old_file() {
        let server = TestServer::start(Reply::Body(b"evil".to_vec()));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        fs::write(&path, "old").unwrap();
        let rid = id(Collection::Files, &path);
        let p = FileProvider::new();
        let before = snapshot(tmp.path());

        let s = source(&server.url("/file"), b"good");
        match p.apply(&rid, &s, ENFORCE) {
            Err(ProviderError::Failed { what, detail }) => {
                assert!(what.contains("download"), "{what}");
                assert!(detail.contains("sha256 mismatch"), "{detail}");
                assert!(
                    detail.contains(&hex::encode(Sha256::digest(b"evil"))),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(server.hits(), 1);
        assert_eq!(snapshot(tmp.path()), before);

        let s = source(&server.url("/missing"), b"good");
        match p.apply(&rid, &s, ENFORCE) {
            Err(ProviderError::Failed { detail, .. }) => {
                assert!(detail.contains("404"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn source_dry_run_never_downloads() {
        let server = TestServer::start(Reply::Body(b"new".to_vec()));
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        let p = FileProvider::new();
        let before = snapshot(tmp.path());
        let c = p
            .apply(
                &id(Collection::Files, &path),
                &source(&server.url("/file"), b"new"),
                DRY,
            )
            .unwrap();
        assert_eq!(c.diff, vec![d("content", sha(b"old"), sha(b"new"))]);
        let c = p
            .apply(
                &id(Collection::Files, &tmp.path().join("missing")),
                &source(&server.url("/file"), b"new"),
                DRY,
            )
            .unwrap();
        assert!(c.changed);
        assert_eq!(server.hits(), 0);
        assert_eq!(snapshot(tmp.path()), before);
    }

    #[test]
    fn source_size_limit_is_exact() {
        let body = vec![b'z'; 1000];
        for reply in [Reply::Body(body.clone()), Reply::Unsized(body.clone())] {
            let announced = matches!(reply, Reply::Body(_));
            let server = TestServer::start(reply);
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("f");
            let rid = id(Collection::Files, &path);

            let at = FileProvider::with_download_limits(1000, Duration::from_secs(30));
            assert!(
                at.apply(&rid, &source(&server.url("/file"), &body), ENFORCE)
                    .unwrap()
                    .changed
            );
            assert_eq!(fs::read(&path).unwrap(), body);
            fs::remove_file(&path).unwrap();

            let under = FileProvider::with_download_limits(999, Duration::from_secs(30));
            match under.apply(&rid, &source(&server.url("/file"), &body), ENFORCE) {
                Err(ProviderError::Failed { detail, .. }) => {
                    assert!(
                        detail.contains("limit of 999"),
                        "announced={announced}: {detail}"
                    );
                    // An announced size fails before the body is read.
                    assert_eq!(detail.contains("announces"), announced, "{detail}");
                }
                other => panic!("announced={announced}: {other:?}"),
            }
            assert!(!path.exists());
            no_temp_files(tmp.path());
            assert_eq!(server.hits(), 2);
        }
    }

    #[test]
    fn source_stalled_server_times_out() {
        let server = TestServer::start(Reply::Stall);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let p = FileProvider::with_download_limits(1000, Duration::from_millis(300));
        let t = Instant::now();
        match p.apply(
            &id(Collection::Files, &path),
            &source(&server.url("/file"), b"x"),
            ENFORCE,
        ) {
            Err(ProviderError::Failed { detail, .. }) => {
                assert!(detail.contains("timeout"), "{detail}")
            }
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(!path.exists());
        no_temp_files(tmp.path());
    }

    #[test]
    fn urls_in_errors_are_redacted() {
        assert_eq!(
            redact_url("https://user:pw@example.com/a/b?sig=secret#frag"),
            "https://<redacted>@example.com/a/b?<redacted>"
        );
        assert_eq!(redact_url("http://example.com/a"), "http://example.com/a");
        assert_eq!(redact_url("http://u@h"), "http://<redacted>@h");

        // A real failure (nothing listens on that port once the listener is dropped).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("http://admin:hunter2@127.0.0.1:{port}/f?token=s3cr3t");
        let err = FileProvider::new()
            .apply(
                &id(Collection::Files, &tmp.path().join("f")),
                &source(&url, b"x"),
                ENFORCE,
            )
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2") && !err.contains("s3cr3t"), "{err}");
        assert!(err.contains("127.0.0.1"), "{err}");
    }

    // -- directories -----------------------------------------------------------------------------

    #[test]
    fn directory_create_idempotent_and_read() {
        let tmp = tempfile::tempdir().unwrap();
        let p = DirectoryProvider::new();
        let path = tmp.path().join("d");
        let rid = id(Collection::Directories, &path);
        let s = spec(
            Collection::Directories,
            json!({"mode": "0750", "owner": "daemon", "group": "bin"}),
        );
        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &s, DRY).unwrap();
        assert_eq!(c.diff, vec![d("ensure", "absent", "present")]);
        assert_eq!(snapshot(tmp.path()), before);

        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), c);
        let m = meta(&path);
        assert!(m.is_dir());
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o750, DAEMON, BIN));
        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), Change::none());
        assert_eq!(
            p.read(&rid).unwrap(),
            json!({"ensure": "present", "mode": "0750", "owner": "daemon", "group": "bin"})
        );

        // Default mode, and sticky bits.
        let plain = tmp.path().join("plain");
        p.apply(
            &id(Collection::Directories, &plain),
            &spec(Collection::Directories, json!({})),
            ENFORCE,
        )
        .unwrap();
        assert_eq!(mode_of(&plain), 0o755);
        let sticky = tmp.path().join("sticky");
        let s = spec(Collection::Directories, json!({"mode": "1777"}));
        p.apply(&id(Collection::Directories, &sticky), &s, ENFORCE)
            .unwrap();
        assert_eq!(mode_of(&sticky), 0o1777);
        assert_eq!(
            p.apply(&id(Collection::Directories, &sticky), &s, DRY)
                .unwrap(),
            Change::none()
        );
    }

    #[test]
    fn directory_metadata_drift_and_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let p = DirectoryProvider::new();
        let path = tmp.path().join("d");
        let rid = id(Collection::Directories, &path);
        let s = spec(
            Collection::Directories,
            json!({"mode": "0755", "owner": "root"}),
        );
        p.apply(&rid, &s, ENFORCE).unwrap();
        fs::write(path.join("child"), "x").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&path, Some(DAEMON), None).unwrap();
        let ino = meta(&path).ino();

        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &s, DRY).unwrap();
        assert_eq!(
            c.diff,
            vec![d("mode", "0700", "0755"), d("owner", "daemon", "root")]
        );
        assert_eq!(snapshot(tmp.path()), before);

        assert_eq!(p.apply(&rid, &s, ENFORCE).unwrap(), c);
        let m = meta(&path);
        assert_eq!((m.mode() & 0o7777, m.uid(), m.ino()), (0o755, 0, ino));
        assert_eq!(fs::read(path.join("child")).unwrap(), b"x");
    }

    #[test]
    fn directory_absent_purge_rules() {
        let tmp = tempfile::tempdir().unwrap();
        let p = DirectoryProvider::new();
        let path = tmp.path().join("d");
        let rid = id(Collection::Directories, &path);
        let absent = spec(Collection::Directories, json!({"ensure": "absent"}));
        let purge = spec(
            Collection::Directories,
            json!({"ensure": "absent", "purge": true}),
        );

        // Empty: removed; twice: nothing.
        fs::create_dir(&path).unwrap();
        assert_eq!(
            p.apply(&rid, &absent, ENFORCE).unwrap().diff,
            vec![d("ensure", "present", "absent")]
        );
        assert!(!path.exists());
        assert_eq!(p.apply(&rid, &absent, ENFORCE).unwrap(), Change::none());

        // Non-empty without purge: refused, untouched (dry run too).
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "precious").unwrap();
        fs::create_dir_all(path.join("sub/deeper")).unwrap();
        fs::write(path.join("sub/deeper/file"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, path.join("sub/link-out")).unwrap();
        std::os::unix::fs::symlink(outside.join("keep"), path.join("file-link")).unwrap();
        let before = snapshot(tmp.path());
        for mode in [DRY, ENFORCE] {
            let msg = invalid(p.apply(&rid, &absent, mode));
            assert!(msg.contains("not empty") && msg.contains("purge"), "{msg}");
        }
        assert_eq!(snapshot(tmp.path()), before);

        // Purge: dry run changes nothing, enforce removes the tree but never what links point to.
        assert_eq!(
            p.apply(&rid, &purge, DRY).unwrap().diff,
            vec![d("ensure", "present", "absent")]
        );
        assert_eq!(snapshot(tmp.path()), before);
        assert!(p.apply(&rid, &purge, ENFORCE).unwrap().changed);
        assert!(fs::symlink_metadata(&path).is_err());
        assert_eq!(fs::read(outside.join("keep")).unwrap(), b"precious");
        assert_eq!(p.apply(&rid, &purge, ENFORCE).unwrap(), Change::none());

        // The root is never removed (checked before anything; dry run only, to be safe).
        let msg = invalid(p.apply(
            &ResourceId::parse(Collection::Directories, "/").unwrap(),
            &purge,
            DRY,
        ));
        assert!(msg.contains("root"), "{msg}");
    }

    #[test]
    fn directory_refuses_other_kinds_at_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let p = DirectoryProvider::new();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let before = snapshot(tmp.path());
        for path in [&link, &file] {
            let rid = id(Collection::Directories, path);
            for s in [
                json!({"mode": "0700"}),
                json!({"ensure": "absent", "purge": true}),
            ] {
                let msg = invalid(p.apply(&rid, &spec(Collection::Directories, s), ENFORCE));
                assert!(msg.contains("refusing"), "{msg}");
            }
        }
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(mode_of(&real), 0o755);

        let missing_parent = tmp.path().join("a/b");
        let msg = invalid(p.apply(
            &id(Collection::Directories, &missing_parent),
            &spec(Collection::Directories, json!({})),
            ENFORCE,
        ));
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(!tmp.path().join("a").exists());
    }

    // -- symlinks ---------------------------------------------------------------------------------

    #[test]
    fn symlink_create_retarget_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let p = SymlinkProvider::new();
        let path = tmp.path().join("l");
        let rid = id(Collection::Symlinks, &path);
        let to_a = spec(Collection::Symlinks, json!({"target": "a"}));
        let to_b = spec(Collection::Symlinks, json!({"target": "/nowhere/b"}));

        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &to_a, DRY).unwrap();
        assert_eq!(
            c.diff,
            vec![d("ensure", "absent", "present"), d("target", "absent", "a")]
        );
        assert_eq!(snapshot(tmp.path()), before);

        // Dangling targets are fine: a link says where, not what.
        assert_eq!(p.apply(&rid, &to_a, ENFORCE).unwrap(), c);
        assert_eq!(fs::read_link(&path).unwrap(), Path::new("a"));
        assert_eq!(p.apply(&rid, &to_a, ENFORCE).unwrap(), Change::none());
        assert_eq!(
            p.read(&rid).unwrap(),
            json!({"ensure": "present", "target": "a"})
        );

        let before = snapshot(tmp.path());
        let c = p.apply(&rid, &to_b, DRY).unwrap();
        assert_eq!(c.diff, vec![d("target", "a", "/nowhere/b")]);
        assert_eq!(snapshot(tmp.path()), before);
        assert_eq!(p.apply(&rid, &to_b, ENFORCE).unwrap(), c);
        assert_eq!(fs::read_link(&path).unwrap(), Path::new("/nowhere/b"));
        no_temp_files(tmp.path());

        // Drift: removed by hand.
        fs::remove_file(&path).unwrap();
        assert_eq!(
            p.apply(&rid, &to_b, DRY).unwrap().diff[0],
            d("ensure", "absent", "present")
        );
    }

    #[test]
    fn symlink_replaces_file_or_empty_dir_only_with_force() {
        let tmp = tempfile::tempdir().unwrap();
        let p = SymlinkProvider::new();
        let plain = spec(Collection::Symlinks, json!({"target": "t"}));
        let force = spec(Collection::Symlinks, json!({"target": "t", "force": true}));

        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let full = tmp.path().join("full");
        fs::create_dir(&full).unwrap();
        fs::write(full.join("inside"), "x").unwrap();

        let before = snapshot(tmp.path());
        for path in [&file, &empty, &full] {
            let msg = invalid(p.apply(&id(Collection::Symlinks, path), &plain, ENFORCE));
            assert!(msg.contains("force") || msg.contains("refusing"), "{msg}");
        }
        let msg = invalid(p.apply(&id(Collection::Symlinks, &full), &force, ENFORCE));
        assert!(msg.contains("not empty"), "{msg}");
        let c = p
            .apply(&id(Collection::Symlinks, &file), &force, DRY)
            .unwrap();
        assert_eq!(
            c.diff,
            vec![d("type", "file", "symlink"), d("target", "absent", "t")]
        );
        assert_eq!(snapshot(tmp.path()), before);

        assert_eq!(
            p.apply(&id(Collection::Symlinks, &file), &force, ENFORCE)
                .unwrap(),
            c
        );
        assert_eq!(fs::read_link(&file).unwrap(), Path::new("t"));
        let c = p
            .apply(&id(Collection::Symlinks, &empty), &force, ENFORCE)
            .unwrap();
        assert_eq!(c.diff[0], d("type", "directory", "symlink"));
        assert_eq!(fs::read_link(&empty).unwrap(), Path::new("t"));
        assert!(full.join("inside").exists());
        no_temp_files(tmp.path());
    }

    #[test]
    fn symlink_absent_removes_only_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let p = SymlinkProvider::new();
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), "x").unwrap();
        let path = tmp.path().join("l");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let rid = id(Collection::Symlinks, &path);
        let absent = spec(Collection::Symlinks, json!({"ensure": "absent"}));

        let before = snapshot(tmp.path());
        assert_eq!(
            p.apply(&rid, &absent, DRY).unwrap().diff,
            vec![d("ensure", "present", "absent")]
        );
        assert_eq!(snapshot(tmp.path()), before);
        assert!(p.apply(&rid, &absent, ENFORCE).unwrap().changed);
        assert!(fs::symlink_metadata(&path).is_err());
        assert!(target.join("keep").exists());
        assert_eq!(p.apply(&rid, &absent, ENFORCE).unwrap(), Change::none());

        // A non-link at the path is refused and kept.
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let msg = invalid(p.apply(&id(Collection::Symlinks, &file), &absent, ENFORCE));
        assert!(msg.contains("not a symlink"), "{msg}");
        assert_eq!(fs::read(&file).unwrap(), b"x");
        assert_eq!(
            p.read(&id(Collection::Symlinks, &file)).unwrap(),
            json!({"ensure": "absent", "type": "file"})
        );
    }
}
