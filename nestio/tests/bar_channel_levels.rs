//! BAR channels between `nestio run` processes (issue 12, item 5): the e1000 device
//! process grants a channel, each `nestio run --export` level passes it down on its
//! export session, and the innermost level's guest (`e1000ping`) reaches the BARs
//! without crossing any level, while configuration space, interrupts and DMA maps still
//! flow through every level. Each exporting level prints what crossed it
//! (`bar_accesses=`, `config_accesses=`, `set_irqs=`, `channel_grants=`), the innermost
//! level what its channel carried (`nestio: bar channel: channel= mediated= fallbacks=`).

mod common;

use common::{child_level, e1000_level0, exporter, kvm_or_skip, stat, Dir, Level};

use std::path::Path;
use std::process::ExitStatus;

/// The innermost level: e1000ping (MSI) on its parent's memory.
fn ping(dir: &Dir, device: &Path, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut args = vec!["run", "--guest", "e1000ping", "--cmdline", "irq=msi"];
    args.extend(extra);
    child_level(dir, "inner", device, &args).finish()
}

fn assert_pinged(st: ExitStatus, out: &str, err: &str) {
    assert!(st.success(), "innermost level failed ({st}): {out}\n{err}");
    assert!(out.contains("interrupts: MSI vector"), "{out}");
    assert!(
        out.contains("ping: echo reply from 10.0.2.2"),
        "{out}\n{err}"
    );
}

fn export(stderr: &str, key: &str) -> u64 {
    stat(stderr, " export: ", key)
}

fn channel(stderr: &str, key: &str) -> u64 {
    stat(stderr, "bar channel: ", key)
}

/// No BAR access crossed this level; configuration space and interrupts did.
fn assert_bypassed(level: &Level) {
    let e = level.stderr();
    assert_eq!(export(&e, "bar_accesses"), 0, "{e}");
    assert!(export(&e, "config_accesses") >= 10, "{e}");
    assert!(export(&e, "set_irqs") >= 1, "{e}");
    assert!(export(&e, "fd_maps") >= 1, "DMA maps still cross: {e}");
    assert_eq!(export(&e, "channel_grants"), 1, "{e}");
}

/// Test `name` (skipped without KVM) on a depth-2 stack in `Dir` `tag`: the device
/// (with `device_extra`), level 1 exporting it (with `l1_extra`) and the innermost
/// level, whose ping must work. Returns `(dir, device, level 1, innermost stderr)`.
fn depth2(
    name: &str,
    tag: &str,
    device_extra: &[&str],
    l1_extra: &[&str],
) -> Option<(Dir, Level, Level, String)> {
    if !kvm_or_skip(name) {
        return None;
    }
    let dir = Dir::new("barchan", tag);
    let (dev, s0) = e1000_level0(&dir, device_extra);
    let s1 = dir.path("s1");
    let l1 = exporter(&dir, "level1", &s0, &s1, None, "", l1_extra);
    let (st, out, err) = ping(&dir, &s1, &[]);
    assert_pinged(st, &out, &err);
    Some((dir, dev, l1, err))
}

/// Level 1 ended as its guest does and no channel was granted: every BAR access
/// crossed it.
fn assert_no_channel(l1: &mut Level, err: &str) {
    assert!(!err.contains("bar channel: "), "{err}");
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    let e = l1.stderr();
    assert!(export(&e, "bar_accesses") >= 20, "{e}");
    assert_eq!(export(&e, "channel_grants"), 0, "{e}");
}

#[test]
fn depth2_guest_bar_accesses_go_over_the_channel() {
    let Some((_dir, _dev, mut l1, err)) = depth2(
        "depth2_guest_bar_accesses_go_over_the_channel",
        "depth2",
        &[],
        &[],
    ) else {
        return;
    };
    assert!(channel(&err, "channel") >= 20, "{err}");
    assert_eq!(channel(&err, "mediated"), 0, "{err}");
    assert_eq!(channel(&err, "fallbacks"), 0, "{err}");
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    assert_bypassed(&l1);
}

#[test]
fn depth3_guest_pings_with_bar_accesses_past_both_levels() {
    let name = "depth3_guest_pings_with_bar_accesses_past_both_levels";
    if !kvm_or_skip(name) {
        return;
    }
    let dir = Dir::new("barchan", "depth3");
    let (_dev, s0) = e1000_level0(&dir, &[]);
    let (s1, s2) = (dir.path("s1"), dir.path("s2"));
    let mut l1 = exporter(&dir, "level1", &s0, &s1, None, "", &[]);
    let mut l2 = exporter(&dir, "level2", &s1, &s2, Some(&dir.path("s1.mem")), "", &[]);
    let (st, out, err) = ping(&dir, &s2, &[]);
    assert_pinged(st, &out, &err);
    assert!(channel(&err, "channel") >= 20, "{err}");
    assert_eq!(channel(&err, "mediated"), 0, "{err}");
    assert_eq!(l2.wait().code(), Some(42), "{}", l2.stderr());
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    assert_bypassed(&l2);
    assert_bypassed(&l1);
}

/// Level 1 revokes the channel when the guest's MSI is wired (its child's third
/// SET_IRQS; the first two wire the VMM's interrupts before the guest runs): the
/// guest's reset, probe and ring setup went over the channel, its ARP and ping
/// through level 1,
/// and level 1 saw exactly the innermost level's mediated ones — none lost, none twice,
/// and the ping still works.
#[test]
fn a_revoked_channel_falls_back_to_the_levels() {
    let Some((_dir, _dev, mut l1, err)) = depth2(
        "a_revoked_channel_falls_back_to_the_levels",
        "revoke",
        &[],
        &["--bar-channel-test-revoke-at-set-irqs", "3"],
    ) else {
        return;
    };
    assert!(channel(&err, "channel") >= 10, "{err}");
    assert!(channel(&err, "mediated") >= 5, "{err}");
    assert_eq!(channel(&err, "fallbacks"), 1, "{err}");
    assert_eq!(l1.wait().code(), Some(42), "{}", l1.stderr());
    let e = l1.stderr();
    assert_eq!(export(&e, "channel_revocations"), 1, "{e}");
    assert_eq!(
        export(&e, "bar_accesses"),
        channel(&err, "mediated"),
        "level 1 saw exactly the accesses that fell back: {e}\n{err}"
    );
}

/// A level that does not pass channels (as an older nestio): the innermost level gets
/// none and every BAR access crosses the level, as before.
#[test]
fn without_channels_every_bar_access_crosses_the_level() {
    let Some((_dir, _dev, mut l1, err)) = depth2(
        "without_channels_every_bar_access_crosses_the_level",
        "off",
        &[],
        &["--bar-channel", "off"],
    ) else {
        return;
    };
    assert_no_channel(&mut l1, &err);
}

/// A device process that grants no channels (`nestio device --bar-channel off`, like an
/// older nestio): level 1's GET upwards is refused, so the innermost level gets none.
#[test]
fn a_device_without_channels_gives_none_down_the_stack() {
    let Some((_dir, _dev, mut l1, err)) = depth2(
        "a_device_without_channels_gives_none_down_the_stack",
        "olddev",
        &["--bar-channel", "off"],
        &[],
    ) else {
        return;
    };
    assert_no_channel(&mut l1, &err);
}
