//! Client data in file-system paths (pure: no I/O). Every value interpolated into a
//! delivery path (`deliver maildir "/srv/mail/${recipient.local}/"`, `deliver mbox`,
//! `lmtp "unix:..."`, `archive`) is one path component: [`component`] maps `/` and every
//! other character outside `A-Z a-z 0-9 - _ .` to `_` and puts `_` before a leading dot,
//! so a value can never be `..`, `.`, empty, or hold a separator. The path is then
//! confined to the directory its literal prefix names ([`confine`]): after lexical
//! normalisation it must stay below that root, and the host walks it from the root
//! without following symbolic links (`transport::local`).

use std::path::{Component, Path, PathBuf};

/// An interpolated value as one safe path component (the rule of the folder-less
/// `deliver maildir`).
pub fn component(value: &str) -> String {
    let safe: String =
        value.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if safe.is_empty() || safe.starts_with('.') {
        format!("_{safe}")
    } else {
        safe
    }
}

/// The directory a template's literal prefix names: the text before the first
/// interpolation, up to and including its last `/`. `None` when that text has no `/`
/// (a relative prefix like `${x}/` is confined to the policy's folder by the caller).
pub fn literal_root(prefix: &str) -> Option<String> {
    prefix.rfind('/').and_then(|i| prefix.get(..=i)).map(str::to_string)
}

/// `path` with `.` and `..` resolved lexically (no file-system access; `..` above the
/// root stays at the root, as the kernel does).
pub fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Why a delivery path is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escape {
    pub path: PathBuf,
    pub root: PathBuf,
}

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not under {}", self.path.display(), self.root.display())
    }
}

/// The part of `path` below `root`, both normalised; an error when `path` is not below it
/// (or is the root itself, for a path that must name something inside it).
pub fn confine(root: &Path, path: &Path) -> Result<PathBuf, Escape> {
    let (r, p) = (normalise(root), normalise(path));
    match p.strip_prefix(&r) {
        Ok(rel) if !rel.as_os_str().is_empty() && !rel.components().any(|c| c == Component::ParentDir) => {
            Ok(rel.to_path_buf())
        }
        _ => Err(Escape { path: p, root: r }),
    }
}

/// A delivery path with the directory it must stay in: `rel` is walked from `root`
/// without following symbolic links. `root` None: a path the policy wrote literally.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Confined {
    pub root: Option<PathBuf>,
    pub path: PathBuf,
}

impl Confined {
    /// The route key form: `ROOT//REL` when confined, the plain path otherwise.
    pub fn key(&self) -> String {
        match &self.root {
            Some(root) => match self.path.strip_prefix(root) {
                Ok(rel) => format!("{}//{}", root.display().to_string().trim_end_matches('/'), rel.display()),
                Err(_) => self.path.display().to_string(),
            },
            None => normalise(&self.path).display().to_string(),
        }
    }

    /// Parses [`Confined::key`].
    pub fn parse(key: &str) -> Confined {
        match key.split_once("//") {
            Some((root, rel)) if !root.is_empty() && !rel.is_empty() => {
                let root = PathBuf::from(root);
                Confined { path: root.join(rel), root: Some(root) }
            }
            _ => Confined { root: None, path: PathBuf::from(key) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolated_values_are_one_component() {
        assert_eq!(component("x/../../../../var/pwned"), "x_.._.._.._.._var_pwned");
        assert_eq!(component(".."), "_..");
        assert_eq!(component(""), "_");
        assert_eq!(component(".hidden"), "_.hidden");
        assert_eq!(component("Jörg"), "J_rg");
        assert_eq!(component("alice"), "alice");
    }

    #[test]
    fn paths_stay_under_the_literal_root() {
        assert_eq!(literal_root("/srv/mail/"), Some("/srv/mail/".into()));
        assert_eq!(literal_root("/srv/mail/u-"), Some("/srv/mail/".into()));
        assert_eq!(literal_root("box-"), None);
        let root = Path::new("/srv/mail/");
        assert_eq!(confine(root, Path::new("/srv/mail/alice/")), Ok(PathBuf::from("alice")));
        assert!(confine(root, Path::new("/srv/mail/../../var/pwned")).is_err());
        assert!(confine(root, Path::new("/srv/mail/")).is_err());
        assert!(confine(root, Path::new("/srv/mailx/a")).is_err());
        let c = Confined { root: Some("/srv/mail".into()), path: "/srv/mail/a/b".into() };
        assert_eq!(c.key(), "/srv/mail//a/b");
        assert_eq!(Confined::parse(&c.key()), c);
        assert_eq!(Confined::parse("/var/mail/x"), Confined { root: None, path: "/var/mail/x".into() });
    }
}
