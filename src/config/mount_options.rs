//! Mount option strings (`a,b=c,nod`): parsing, merging user options over a backend's
//! defaults, and the lock-safety rules that apply to them.
//!
//! One parser serves the config's `[storage] options`, the `-o` string mount(8) hands the
//! helper, and the option fields of `/proc/self/mountinfo`, so all three agree on what an
//! option is.

use std::fmt;

/// Errors in a mount option string.
#[derive(Debug, displaydoc::Display, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    /// mount option `{item}`: a value may not contain `=` (mount(8) would split it differently)
    EqualsInValue { item: String },
    /// mount option `{key}=` holds a password, which would show to every user through ps and /proc/*/cmdline; put it in a credentials file (`credentials_file`)
    Secret { key: String },
    /// mount option `{item}`: an option name may not be empty or contain white space
    BadName { item: String },
    /// mount options `{text}`: a `"` is not closed (a quoted value, such as an SELinux
    /// `context="..."` holding commas, ends with a second `"`)
    UnclosedQuote { text: String },
}

/// An ordered list of mount options; `None` values are plain flags (`hard`), `Some` are `key=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    items: Vec<(String, Option<String>)>,
}

/// Option names that mean the same thing to the kernel: setting one replaces the others.
const SYNONYMS: &[&[&str]] = &[&["vers", "nfsvers"]];

/// Flags that contradict each other: setting one removes the other.
const OPPOSITES: &[(&str, &str)] = &[("hard", "soft"), ("ro", "rw"), ("lock", "nolock")];

impl MountOptions {
    /// Parses `a,b=c,,d`. Empty items are skipped; a value holding `=` is refused; a comma
    /// between double quotes is part of its item, as libmount reads it
    /// (`context="system_u:object_r:nfs_t:s0:c1,c2"` is one option).
    pub fn parse(text: &str) -> Result<Self, OptionsError> {
        if text.chars().filter(|c| *c == '"').count() % 2 == 1 {
            return Err(OptionsError::UnclosedQuote {
                text: text.to_owned(),
            });
        }
        let mut items = Vec::new();
        for item in split_items(text)
            .into_iter()
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => {
                    // (an account key in base64 ends in `=`: the message must not echo it)
                    if v.contains('=') && holds_secret(k, v) {
                        return Err(OptionsError::Secret { key: k.to_owned() });
                    }
                    if v.contains('=') {
                        return Err(OptionsError::EqualsInValue {
                            item: item.to_owned(),
                        });
                    }
                    (k, Some(v.to_owned()))
                }
                None => (item, None),
            };
            if key.is_empty() || key.chars().any(char::is_whitespace) {
                return Err(OptionsError::BadName {
                    item: item.to_owned(),
                });
            }
            items.push((key.to_owned(), value));
        }
        Ok(Self { items })
    }

    /// True when no option is set.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The option names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|(k, _)| k.as_str())
    }

    /// Whether `key` is present, as a flag or with a value.
    pub fn contains(&self, key: &str) -> bool {
        self.items.iter().any(|(k, _)| k == key)
    }

    /// The value of the last `key=value` for `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Removes every `key` and returns the last value it had (`Some(None)` for a flag).
    pub fn take(&mut self, key: &str) -> Option<Option<String>> {
        let mut last = None;
        self.items.retain(|(k, v)| {
            if k == key {
                last = Some(v.clone());
                false
            } else {
                true
            }
        });
        last
    }

    /// Keeps only the options for which `keep(name, value)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, Option<&str>) -> bool) {
        self.items.retain(|(k, v)| keep(k, v.as_deref()));
    }

    /// Appends every option of `more` after these.
    pub fn extend(&mut self, more: MountOptions) {
        self.items.extend(more.items);
    }

    /// Appends one option after the others.
    pub fn push(&mut self, key: &str, value: Option<&str>) {
        self.items.push((key.to_owned(), value.map(str::to_owned)));
    }

    /// `self` (the defaults) with every option of `user` applied on top: a user option replaces
    /// a default with the same name, a synonym (`vers`/`nfsvers`) or the opposite flag
    /// (`soft` over `hard`, `noX` over `X`), and keeps the user's order after the defaults.
    pub fn overridden_by(&self, user: &MountOptions) -> MountOptions {
        let mut merged = self.clone();
        for (key, _) in &user.items {
            merged.items.retain(|(k, _)| !conflicts(k, key));
        }
        merged.items.extend(user.items.iter().cloned());
        merged
    }
}

/// Options whose value is a password (mount.cifs' names).
pub(crate) const SECRET_OPTIONS: &[&str] = &["password", "pass", "password2"];

/// Whether `key=value` carries a password: a password option, or a user name with `%`, after
/// which mount.cifs reads the password.
fn holds_secret(key: &str, value: &str) -> bool {
    SECRET_OPTIONS.contains(&key) || (matches!(key, "username" | "user") && value.contains('%'))
}

/// Whether option `a` is replaced when the user sets option `b`.
fn conflicts(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if SYNONYMS
        .iter()
        .any(|group| group.contains(&a) && group.contains(&b))
    {
        return true;
    }
    if OPPOSITES
        .iter()
        .any(|&(x, y)| (a == x && b == y) || (a == y && b == x))
    {
        return true;
    }
    a.strip_prefix("no") == Some(b) || b.strip_prefix("no") == Some(a)
}

impl fmt::Display for MountOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(key)?;
            if let Some(v) = value {
                write!(f, "={v}")?;
            }
        }
        Ok(())
    }
}

/// `text` cut at each comma outside double quotes (an unclosed quote runs to the end).
pub(crate) fn split_items(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

/// Why a set of options makes file locks host-local, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHazard {
    /// The offending option as written (`nolock`, `local_lock=all`, `nobrl`).
    pub option: String,
    /// What the option does to locks.
    pub effect: &'static str,
    /// How to fix it.
    pub fix: &'static str,
}

/// The first option in `opts` that makes locks local to this host on a filesystem of type
/// `fs_type` (`nfs`, `nfs4`, `cifs`, `smb3`), or `None` if locks reach the server.
pub fn lock_hazard(fs_type: &str, opts: &MountOptions) -> Option<LockHazard> {
    let nfs = fs_type.starts_with("nfs");
    let cifs = fs_type == "cifs" || fs_type == "smb3";
    if nfs && opts.contains("nolock") {
        return Some(LockHazard {
            option: "nolock".into(),
            effect: "NFS locks are kept on this host only, so both VMs can hold the lock",
            fix: "remove `nolock` from the mount options and remount",
        });
    }
    if nfs {
        if let Some(v) = opts.value("local_lock").filter(|v| *v != "none") {
            return Some(LockHazard {
                option: format!("local_lock={v}"),
                effect: "NFS locks of that kind are kept on this host only, so both VMs can hold the lock",
                fix: "remove `local_lock=` (or set `local_lock=none`) and remount",
            });
        }
    }
    // (cifs before Linux 5.11, RHEL 8's 4.18 among them, reads `nolock` as `nobrl`)
    if let Some(option) = ["nobrl", "nolock"]
        .into_iter()
        .find(|o| cifs && opts.contains(o))
    {
        return Some(LockHazard {
            option: option.into(),
            effect:
                "SMB byte-range locks are not sent to the server, so both VMs can hold the lock",
            fix: if option == "nobrl" {
                "remove `nobrl` from the mount options and remount"
            } else {
                "remove `nolock` (older kernels read it as `nobrl` for SMB) and remount"
            },
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> MountOptions {
        MountOptions::parse(s).unwrap()
    }

    #[test]
    fn parses_flags_and_values_and_skips_empty_items() {
        let o = p("hard, timeo=600,,noresvport");
        assert!(o.contains("hard"));
        assert_eq!(o.value("timeo"), Some("600"));
        assert_eq!(o.to_string(), "hard,timeo=600,noresvport");
    }

    /// Regression: an SELinux context holding a comma was cut in two at it, and the share
    /// mounted with a broken context and an unknown option `c2"`.
    #[test]
    fn a_quoted_value_keeps_its_commas() {
        let text = r#"hard,context="system_u:object_r:nfs_t:s0:c1,c2",timeo=600"#;
        let o = p(text);
        assert_eq!(
            o.value("context"),
            Some(r#""system_u:object_r:nfs_t:s0:c1,c2""#)
        );
        assert!(o.contains("timeo") && !o.contains(r#"c2""#));
        assert_eq!(o.to_string(), text);
        let msg = MountOptions::parse(r#"hard,context="a,b"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("is not closed"), "{msg}");
        // the parts of an unclosed quote are cut as mountinfo's lenient reading needs
        assert_eq!(split_items(r#"a,b="c,d"#), ["a", r#"b="c,d"#]);
    }

    #[test]
    fn refuses_equals_inside_a_value() {
        assert_eq!(
            MountOptions::parse("backend=efs,sec=a=b"),
            Err(OptionsError::EqualsInValue {
                item: "sec=a=b".into()
            })
        );
        let msg = MountOptions::parse("x=1=2").unwrap_err().to_string();
        assert!(
            msg.contains("`x=1=2`") && msg.contains("may not contain `=`"),
            "{msg}"
        );
    }

    /// An Azure storage account key is base64 and ends in `==`: `password=<key>` failed to parse
    /// as a value holding `=`, and that message, printed by check-config, the agent (to
    /// journald) and the helper, echoed the whole key instead of pointing to a credentials
    /// file.
    #[test]
    fn issue2_a_password_holding_equals_is_refused_without_echoing_it() {
        let key = "Zm9vYmFyYmF6cXV4c2VjcmV0a2V5MTIzNDU2Nzg5MA==";
        for (text, named) in [
            (format!("username=acct,password={key}"), "`password=`"),
            (format!("pass={key}"), "`pass=`"),
            (format!("username=acct%{key},vers=3.1.1"), "`username=`"),
        ] {
            let msg = MountOptions::parse(&text).unwrap_err().to_string();
            assert!(!msg.contains(key), "the key is echoed: {msg}");
            assert!(
                msg.contains(named) && msg.contains("credentials file"),
                "{msg}"
            );
        }
        // other values holding `=` are still named whole
        let msg = MountOptions::parse("sec=a=b").unwrap_err().to_string();
        assert!(msg.contains("`sec=a=b`"), "{msg}");
    }

    #[test]
    fn refuses_empty_names() {
        assert!(matches!(
            MountOptions::parse("=3"),
            Err(OptionsError::BadName { .. })
        ));
        assert!(matches!(
            MountOptions::parse("a b"),
            Err(OptionsError::BadName { .. })
        ));
    }

    #[test]
    fn user_options_override_defaults_by_name_synonym_and_opposite() {
        let defaults = p("nfsvers=4.1,rsize=1048576,hard,timeo=600,noresvport");
        let merged = defaults.overridden_by(&p("vers=4.2,soft,timeo=30,resvport,ro"));
        assert_eq!(
            merged.to_string(),
            "rsize=1048576,vers=4.2,soft,timeo=30,resvport,ro"
        );
    }

    #[test]
    fn detects_lock_hazards() {
        assert_eq!(
            lock_hazard("nfs4", &p("rw,nolock")).unwrap().option,
            "nolock"
        );
        assert_eq!(
            lock_hazard("nfs", &p("vers=3,local_lock=all"))
                .unwrap()
                .option,
            "local_lock=all"
        );
        assert!(lock_hazard("nfs4", &p("local_lock=none")).is_none());
        assert_eq!(lock_hazard("cifs", &p("nobrl")).unwrap().option, "nobrl");
        // cifs before Linux 5.11 reads nolock as nobrl; nobrl means nothing to nfs
        assert_eq!(lock_hazard("cifs", &p("nolock")).unwrap().option, "nolock");
        assert_eq!(lock_hazard("smb3", &p("nolock")).unwrap().option, "nolock");
        assert!(lock_hazard("nfs4", &p("nobrl")).is_none());
        assert!(lock_hazard("ext4", &p("nolock")).is_none());
    }

    proptest! {
        /// Printing and re-parsing is lossless, and a user option always survives a merge.
        #[test]
        fn display_round_trips_and_user_wins(
            keys in proptest::collection::vec("[a-z_]{1,8}(=[a-z0-9./]{0,6})?", 0..8),
            user in "[a-z_]{1,8}(=[a-z0-9]{1,4})?",
        ) {
            let text = keys.join(",");
            let o = MountOptions::parse(&text).unwrap();
            prop_assert_eq!(MountOptions::parse(&o.to_string()).unwrap(), o.clone());
            let u = MountOptions::parse(&user).unwrap();
            let merged = o.overridden_by(&u);
            let (k, v) = user.split_once('=').map_or((user.as_str(), None), |(k, v)| (k, Some(v)));
            prop_assert!(merged.contains(k));
            if let Some(v) = v { prop_assert_eq!(merged.value(k), Some(v)); }
        }
    }
}
