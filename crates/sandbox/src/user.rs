//! `--user NAME|UID`: give up root after set-up, before the seccomp filter goes on.
//!
//! Set-up may need privileges (opening `/dev/kvm`, a TAP device, binding a socket in a
//! root-owned directory); serving and running do not. [`User::drop_to`] sets the
//! supplementary groups to the user's primary group only, then the real, effective and
//! saved group and user ids (`setgroups`, `setresgid`, `setresuid`: glibc applies them to
//! every thread of the process), and checks that root cannot be regained. Descriptors
//! opened during set-up stay usable; the process can still reopen descriptors it holds
//! through `/proc/self/fd` (the kernel always lets a process at its own fds).

use std::ffi::CString;

/// Why a user could not be resolved or switched to.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// No such user name in the password database.
    #[error("--user {0}: no such user (give a user name from /etc/passwd or a numeric uid)")]
    Unknown(String),
    /// The name contains a NUL byte.
    #[error("--user {0:?}: not a valid user name")]
    BadName(String),
    /// A system call failed.
    #[error("cannot switch to user {user} (uid {uid}, gid {gid}): {what} failed: {err} (switching users needs root, or CAP_SETUID and CAP_SETGID)")]
    Switch {
        /// The user as given.
        user: String,
        /// Its uid.
        uid: u32,
        /// Its gid.
        gid: u32,
        /// The call.
        what: &'static str,
        /// Its error.
        err: std::io::Error,
    },
    /// After the switch, root could be regained (the switch did not stick).
    #[error("switched to user {user} (uid {uid}) but setuid(0) still succeeds: refusing to go on")]
    NotDropped {
        /// The user as given.
        user: String,
        /// Its uid.
        uid: u32,
    },
}

/// A user to run as: uid and primary gid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// As given on the command line.
    pub spec: String,
    /// The user id.
    pub uid: u32,
    /// The primary group id (the user's from the password database; a numeric uid
    /// without an entry gets the gid equal to it).
    pub gid: u32,
}

impl User {
    /// Resolve `NAME` or a numeric `UID` through the password database.
    pub fn resolve(spec: &str) -> Result<User, UserError> {
        if let Ok(uid) = spec.parse::<u32>() {
            let gid = lookup(|pwd, buf, res| {
                // SAFETY: all pointers are valid for the call; buf's length is passed.
                unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), res) }
            })
            .map_or(uid, |(_, gid)| gid);
            return Ok(User {
                spec: spec.into(),
                uid,
                gid,
            });
        }
        let name = CString::new(spec).map_err(|_| UserError::BadName(spec.into()))?;
        let (uid, gid) = lookup(|pwd, buf, res| {
            // SAFETY: `name` is NUL-terminated; other pointers are valid, buf's length is
            // passed.
            unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), res) }
        })
        .ok_or_else(|| UserError::Unknown(spec.into()))?;
        Ok(User {
            spec: spec.into(),
            uid,
            gid,
        })
    }

    /// Switch this process (every thread) to the user, for good.
    pub fn drop_to(&self) -> Result<(), UserError> {
        let fail = |what, err| UserError::Switch {
            user: self.spec.clone(),
            uid: self.uid,
            gid: self.gid,
            what,
            err,
        };
        let groups = [self.gid];
        // SAFETY: plain system calls with a valid one-element group array.
        unsafe {
            if libc::setgroups(1, groups.as_ptr()) != 0 {
                return Err(fail("setgroups", std::io::Error::last_os_error()));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(fail("setresgid", std::io::Error::last_os_error()));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(fail("setresuid", std::io::Error::last_os_error()));
            }
            if self.uid != 0 && libc::setuid(0) == 0 {
                return Err(UserError::NotDropped {
                    user: self.spec.clone(),
                    uid: self.uid,
                });
            }
        }
        tracing::info!(user = %self.spec, uid = self.uid, gid = self.gid, "running as user");
        Ok(())
    }
}

/// Runs a `getpw*_r` call with a growing buffer; the entry's (uid, gid), if any.
fn lookup(
    mut call: impl FnMut(*mut libc::passwd, &mut Vec<libc::c_char>, *mut *mut libc::passwd) -> i32,
) -> Option<(u32, u32)> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid out-parameter.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut res: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, &mut buf, &mut res);
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || res.is_null() {
            return None;
        }
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_and_number() {
        let root = User::resolve("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(User::resolve("0").unwrap().uid, 0);
        // A uid without an entry is still usable, with the gid of the same number.
        let u = User::resolve("4000123").unwrap();
        assert_eq!((u.uid, u.gid), (4000123, 4000123));
        let e = User::resolve("no-such-user-h7").unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
        assert!(matches!(User::resolve("a\0b"), Err(UserError::BadName(_))));
    }
}
