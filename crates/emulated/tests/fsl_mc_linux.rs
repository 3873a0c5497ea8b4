//! nestio's FSL-MC encodings against Linux's own headers (Debian `linux-source-6.1`):
//! command ids, status codes, flags, API versions, VFIO constants and the byte offset
//! of every parameter field nestio encodes — so the encodings are the kernel's, not a
//! restatement. A small parser reads `#define`s (evaluating `X_CMD(0x...)` through the
//! macro's own definition), enums and `struct { __le32 x; u8 y[16]; }` layouts.
//!
//! The source comes from the kernel tree `linux/build.sh` unpacks into
//! `target/linux/linux-source-6.1` (`scripts/test.sh` always does), or else straight
//! from `/usr/src/linux-source-6.1.tar.xz` (only the files needed are extracted).
//! Without either, this SKIPs loudly, and fails in CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nestio_device_model::{flags, region_flags, VfioDevice};
use nestio_emulated::fsl_mc::driver::{Mc, RegionPortal};
use nestio_emulated::fsl_mc::objects::{
    cmd, layout, ObjType, RegionType, DPNI_IRQ_EVENT_LINK_CHANGED, DPRC_RESET_OPTION_NON_RECURSIVE,
    IS_DPRC, OBJ_STATE_OPEN, OBJ_STATE_PLUGGED, REGION_CACHEABLE, REGION_SHAREABLE,
    VENDOR_FREESCALE,
};
use nestio_emulated::fsl_mc::portal::{FLAG_INTR_DIS, FLAG_PRI, NUM_PARAMS};
use nestio_emulated::fsl_mc::{CmdId, McStatus, Params, REGION_OFFSET_SHIFT};

const FILES: &[&str] = &[
    "include/linux/fsl/mc.h",
    "include/uapi/linux/fsl_mc.h",
    "include/uapi/linux/vfio.h",
    "drivers/bus/fsl-mc/fsl-mc-private.h",
    "drivers/vfio/fsl-mc/vfio_fsl_mc_private.h",
    "drivers/net/ethernet/freescale/dpaa2/dpni-cmd.h",
    "drivers/net/ethernet/freescale/dpaa2/dpni.h",
    "drivers/net/ethernet/freescale/dpaa2/dpmac-cmd.h",
    "drivers/soc/fsl/dpio/dpio-cmd.h",
];
const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";

/// The directory holding `linux-source-6.1/<FILES>`, or None.
fn source() -> Option<PathBuf> {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/linux");
    if FILES
        .iter()
        .all(|f| tree.join("linux-source-6.1").join(f).exists())
    {
        return Some(tree);
    }
    if !Path::new(TARBALL).exists() {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("nestio-fsl-mc-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let ok = std::process::Command::new("tar")
        .arg("-xJf")
        .arg(TARBALL)
        .arg("-C")
        .arg(&dir)
        .args(FILES.iter().map(|f| format!("linux-source-6.1/{f}")))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(dir)
}

#[derive(Default)]
struct Headers {
    /// Object-like defines: name -> body.
    defines: BTreeMap<String, String>,
    /// Function-like defines: name -> (parameter, body).
    macros: BTreeMap<String, (String, String)>,
    /// Enumerators: name -> value.
    enums: BTreeMap<String, i64>,
    /// Structs: name -> fields (name, offset, size).
    structs: BTreeMap<String, Vec<(String, usize, usize)>>,
}

fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        match rest[i..].find("*/") {
            Some(j) => rest = &rest[i + j + 2..],
            None => return out,
        }
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Headers {
    fn parse(&mut self, text: &str) {
        let text = strip_comments(&text.replace("\\\n", " "));
        let lines: Vec<&str> = text.lines().collect();
        // Defines first (some live inside struct bodies, like vfio.h's device flags).
        for line in &lines {
            if let Some(rest) = line.trim().strip_prefix("#define") {
                let rest = rest.trim();
                let name_end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..name_end];
                let after = &rest[name_end..];
                if let Some(params) = after.strip_prefix('(') {
                    if let Some(close) = params.find(')') {
                        self.macros.insert(
                            name.into(),
                            (
                                params[..close].trim().into(),
                                params[close + 1..].trim().into(),
                            ),
                        );
                    }
                } else if !after.trim().is_empty() {
                    self.defines.insert(name.into(), after.trim().into());
                }
            }
        }
        let lines: Vec<&str> = lines
            .into_iter()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i].trim();
            if let Some(rest) = line.strip_prefix("enum ") {
                if rest.trim_end().ends_with('{') {
                    let mut next = 0i64;
                    i += 1;
                    while i < lines.len() && !lines[i].contains('}') {
                        for entry in lines[i].split(',') {
                            let e = entry.trim();
                            if e.is_empty() {
                                continue;
                            }
                            let (n, v) = match e.split_once('=') {
                                Some((n, v)) => (n.trim(), self.eval(v.trim()).unwrap_or(next)),
                                None => (e, next),
                            };
                            self.enums.insert(n.into(), v);
                            next = v + 1;
                        }
                        i += 1;
                    }
                }
            } else if let Some(rest) = line.strip_prefix("struct ") {
                if let Some(name) = rest.strip_suffix('{').map(str::trim) {
                    let mut fields = Vec::new();
                    let mut off = 0usize;
                    let mut ok = true;
                    i += 1;
                    while i < lines.len() && !lines[i].trim_start().starts_with('}') {
                        let f = lines[i].trim().trim_end_matches(';');
                        i += 1;
                        if f.is_empty() {
                            continue;
                        }
                        let mut w = f.split_whitespace();
                        let (Some(ty), Some(decl)) = (w.next(), w.next()) else {
                            ok = false;
                            continue;
                        };
                        let size = match ty {
                            "u8" => 1,
                            "__le16" | "u16" => 2,
                            "__le32" | "u32" => 4,
                            "__le64" | "u64" => 8,
                            _ => {
                                ok = false;
                                continue;
                            }
                        };
                        let (fname, count) = match decl.split_once('[') {
                            Some((n, c)) => {
                                (n, c.trim_end_matches(']').parse::<usize>().unwrap_or(0))
                            }
                            None => (decl, 1),
                        };
                        off = off.next_multiple_of(size);
                        fields.push((fname.to_string(), off, size * count));
                        off += size * count;
                    }
                    if ok {
                        self.structs.insert(name.into(), fields);
                    }
                }
            }
            i += 1;
        }
    }

    /// Evaluate an integer expression of numbers, known names, macro calls, `<<`, `|`
    /// and parentheses.
    fn eval(&self, e: &str) -> Option<i64> {
        let toks = tokenize(e)?;
        let mut pos = 0;
        let v = self.or(&toks, &mut pos, 0)?;
        (pos == toks.len()).then_some(v)
    }
    fn or(&self, t: &[String], p: &mut usize, depth: u32) -> Option<i64> {
        let mut v = self.shift(t, p, depth)?;
        while t.get(*p).map(String::as_str) == Some("|") {
            *p += 1;
            v |= self.shift(t, p, depth)?;
        }
        Some(v)
    }
    fn shift(&self, t: &[String], p: &mut usize, depth: u32) -> Option<i64> {
        let mut v = self.primary(t, p, depth)?;
        while t.get(*p).map(String::as_str) == Some("<<") {
            *p += 1;
            v <<= self.primary(t, p, depth)?;
        }
        Some(v)
    }
    fn primary(&self, t: &[String], p: &mut usize, depth: u32) -> Option<i64> {
        if depth > 16 {
            return None;
        }
        let tok = t.get(*p)?.clone();
        *p += 1;
        if tok == "(" {
            let v = self.or(t, p, depth + 1)?;
            (t.get(*p)? == ")").then_some(())?;
            *p += 1;
            return Some(v);
        }
        if let Some(n) = number(&tok) {
            return Some(n);
        }
        if let Some((param, body)) = self.macros.get(&tok) {
            (t.get(*p)? == "(").then_some(())?;
            *p += 1;
            let arg = self.or(t, p, depth + 1)?;
            (t.get(*p)? == ")").then_some(())?;
            *p += 1;
            let body = tokenize(body)?
                .into_iter()
                .map(|x| if &x == param { arg.to_string() } else { x })
                .collect::<Vec<_>>();
            let mut q = 0;
            return self.or(&body, &mut q, depth + 1);
        }
        if let Some(v) = self.enums.get(&tok) {
            return Some(*v);
        }
        let body = self.defines.get(&tok)?;
        let toks = tokenize(body)?;
        let mut q = 0;
        self.or(&toks, &mut q, depth + 1)
    }
    fn value(&self, name: &str) -> Option<i64> {
        self.enums
            .get(name)
            .copied()
            .or_else(|| self.eval(self.defines.get(name)?))
    }
}

fn number(tok: &str) -> Option<i64> {
    let t = tok.trim_end_matches(['U', 'u', 'L', 'l']);
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => i64::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

fn tokenize(e: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let c: Vec<char> = e.chars().collect();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            ' ' | '\t' => i += 1,
            '(' | ')' | '|' => {
                out.push(c[i].to_string());
                i += 1;
            }
            '<' if c.get(i + 1) == Some(&'<') => {
                out.push("<<".into());
                i += 2;
            }
            x if x.is_alphanumeric() || x == '_' => {
                let s = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                out.push(c[s..i].iter().collect());
            }
            _ => return None,
        }
    }
    Some(out)
}

#[test]
fn fsl_mc_encodings_match_linux_6_1_headers() {
    let Some(dir) = source() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "neither target/linux/linux-source-6.1 nor {TARBALL} exists in CI: scripts/test.sh installs linux-source-6.1"
        );
        eprintln!("SKIP: no Linux 6.1 source (install linux-source-6.1): FSL-MC encodings not compared with Linux");
        return;
    };
    let mut h = Headers::default();
    for f in FILES {
        let p = dir.join("linux-source-6.1").join(f);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        h.parse(&text);
    }
    let mut compared = 0;
    let mut check = |name: &str, ours: i64, h: &Headers| {
        assert_eq!(h.value(name), Some(ours), "{name}: Linux vs nestio");
        compared += 1;
    };

    // Command ids.
    let mut ids: Vec<(String, CmdId)> = vec![
        ("DPRC_CMDID_CLOSE".into(), cmd::CLOSE),
        ("DPRC_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
        ("DPRC_CMDID_RESET_CONT".into(), cmd::RESET),
        ("DPRC_CMDID_RESET_CONT_V2".into(), cmd::DPRC_RESET_CONT_V2),
        ("DPRC_CMDID_SET_IRQ".into(), cmd::SET_IRQ),
        ("DPRC_CMDID_SET_IRQ_ENABLE".into(), cmd::SET_IRQ_ENABLE),
        ("DPRC_CMDID_SET_IRQ_MASK".into(), cmd::SET_IRQ_MASK),
        ("DPRC_CMDID_GET_IRQ_STATUS".into(), cmd::GET_IRQ_STATUS),
        ("DPRC_CMDID_CLEAR_IRQ_STATUS".into(), cmd::CLEAR_IRQ_STATUS),
        ("DPRC_CMDID_GET_CONT_ID".into(), cmd::DPRC_GET_CONT_ID),
        ("DPRC_CMDID_GET_OBJ_COUNT".into(), cmd::DPRC_GET_OBJ_COUNT),
        ("DPRC_CMDID_GET_OBJ".into(), cmd::DPRC_GET_OBJ),
        ("DPRC_CMDID_GET_OBJ_REG".into(), cmd::DPRC_GET_OBJ_REG),
        ("DPRC_CMDID_GET_OBJ_REG_V2".into(), cmd::DPRC_GET_OBJ_REG_V2),
        ("DPRC_CMDID_GET_OBJ_REG_V3".into(), cmd::DPRC_GET_OBJ_REG_V3),
        ("DPRC_CMDID_SET_OBJ_IRQ".into(), cmd::DPRC_SET_OBJ_IRQ),
        ("DPRC_CMDID_GET_CONNECTION".into(), cmd::DPRC_GET_CONNECTION),
        ("DPMNG_CMDID_GET_VERSION".into(), cmd::DPMNG_GET_VERSION),
        ("OBJ_CMDID_CLOSE".into(), cmd::CLOSE),
        ("OBJ_CMDID_RESET".into(), cmd::RESET),
        ("DPMCP_CMDID_CLOSE".into(), cmd::CLOSE),
        ("DPMCP_CMDID_RESET".into(), cmd::RESET),
        ("DPNI_CMDID_ENABLE".into(), cmd::ENABLE),
        ("DPNI_CMDID_DISABLE".into(), cmd::DISABLE),
        ("DPNI_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
        ("DPNI_CMDID_RESET".into(), cmd::RESET),
        ("DPNI_CMDID_IS_ENABLED".into(), cmd::IS_ENABLED),
        ("DPNI_CMDID_SET_IRQ".into(), cmd::SET_IRQ),
        ("DPNI_CMDID_GET_IRQ".into(), cmd::GET_IRQ),
        ("DPNI_CMDID_SET_IRQ_ENABLE".into(), cmd::SET_IRQ_ENABLE),
        ("DPNI_CMDID_GET_IRQ_ENABLE".into(), cmd::GET_IRQ_ENABLE),
        ("DPNI_CMDID_SET_IRQ_MASK".into(), cmd::SET_IRQ_MASK),
        ("DPNI_CMDID_GET_IRQ_MASK".into(), cmd::GET_IRQ_MASK),
        ("DPNI_CMDID_GET_IRQ_STATUS".into(), cmd::GET_IRQ_STATUS),
        ("DPNI_CMDID_CLEAR_IRQ_STATUS".into(), cmd::CLEAR_IRQ_STATUS),
        ("DPNI_CMDID_GET_LINK_STATE".into(), cmd::DPNI_GET_LINK_STATE),
        (
            "DPNI_CMDID_SET_MAX_FRAME_LENGTH".into(),
            cmd::DPNI_SET_MAX_FRAME_LENGTH,
        ),
        (
            "DPNI_CMDID_GET_MAX_FRAME_LENGTH".into(),
            cmd::DPNI_GET_MAX_FRAME_LENGTH,
        ),
        ("DPIO_CMDID_ENABLE".into(), cmd::ENABLE),
        ("DPIO_CMDID_DISABLE".into(), cmd::DISABLE),
        ("DPIO_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
        ("DPIO_CMDID_RESET".into(), cmd::RESET),
        ("DPBP_CMDID_ENABLE".into(), cmd::ENABLE),
        ("DPBP_CMDID_DISABLE".into(), cmd::DISABLE),
        ("DPBP_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
        ("DPBP_CMDID_RESET".into(), cmd::RESET),
        ("DPCON_CMDID_ENABLE".into(), cmd::ENABLE),
        ("DPCON_CMDID_DISABLE".into(), cmd::DISABLE),
        ("DPCON_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
        ("DPCON_CMDID_RESET".into(), cmd::RESET),
        ("DPMAC_CMDID_GET_ATTR".into(), cmd::GET_ATTR),
    ];
    for t in ObjType::ALL {
        let up = t.name().to_uppercase();
        ids.push((format!("{up}_CMDID_OPEN"), t.open_cmd()));
        if h.defines
            .contains_key(&format!("{up}_CMDID_GET_API_VERSION"))
        {
            ids.push((format!("{up}_CMDID_GET_API_VERSION"), t.api_version_cmd()));
        }
    }
    for (name, id) in &ids {
        check(name, id.raw() as i64, &h);
    }
    // The MC-API commands nestio refuses in an assigned container are not in Linux.
    for (id, name) in [
        (cmd::DPRC_CREATE_CONT, "DPRC_CMDID_CREATE_CONT"),
        (cmd::DPRC_ASSIGN, "DPRC_CMDID_ASSIGN"),
    ] {
        assert!(
            h.value(name).is_none(),
            "{name} is now in Linux: compare it ({id:?})"
        );
    }

    // Status codes, flags, constants.
    for (s, name) in McStatus::ALL {
        check(name, s as i64, &h);
    }
    check("MC_CMD_FLAG_PRI", FLAG_PRI as i64, &h);
    check("MC_CMD_FLAG_INTR_DIS", FLAG_INTR_DIS as i64, &h);
    check("MC_CMD_NUM_OF_PARAMS", NUM_PARAMS as i64, &h);
    check("FSL_MC_VENDOR_FREESCALE", VENDOR_FREESCALE as i64, &h);
    check("FSL_MC_OBJ_STATE_OPEN", OBJ_STATE_OPEN as i64, &h);
    check("FSL_MC_OBJ_STATE_PLUGGED", OBJ_STATE_PLUGGED as i64, &h);
    check("FSL_MC_REGION_CACHEABLE", REGION_CACHEABLE as i64, &h);
    check("FSL_MC_REGION_SHAREABLE", REGION_SHAREABLE as i64, &h);
    check("FSL_MC_IS_DPRC", IS_DPRC as i64, &h);
    check(
        "DPRC_RESET_OPTION_NON_RECURSIVE",
        DPRC_RESET_OPTION_NON_RECURSIVE as i64,
        &h,
    );
    check(
        "DPNI_IRQ_EVENT_LINK_CHANGED",
        DPNI_IRQ_EVENT_LINK_CHANGED as i64,
        &h,
    );
    check(
        "DPRC_REGION_TYPE_MC_PORTAL",
        RegionType::McPortal as i64,
        &h,
    );
    check(
        "DPRC_REGION_TYPE_QBMAN_PORTAL",
        RegionType::QbmanPortal as i64,
        &h,
    );
    check("VFIO_FSL_MC_OFFSET_SHIFT", REGION_OFFSET_SHIFT as i64, &h);
    check("VFIO_DEVICE_FLAGS_FSL_MC", flags::FSL_MC as i64, &h);
    check("VFIO_DEVICE_FLAGS_RESET", flags::RESET as i64, &h);
    check("VFIO_REGION_INFO_FLAG_MMAP", region_flags::MMAP as i64, &h);
    check("DPRC_CMD_ID_OFFSET", 4, &h);

    // API versions: Linux's <TYPE>_VER_MAJOR/MINOR where it has them; its minimum
    // where it has only that.
    for t in ObjType::ALL {
        let up = t.name().to_uppercase();
        let (maj, min) = t.api_version();
        if let Some(lmaj) = h.value(&format!("{up}_VER_MAJOR")) {
            assert_eq!(
                (maj as i64, min as i64),
                (lmaj, h.value(&format!("{up}_VER_MINOR")).unwrap()),
                "{up} version"
            );
            compared += 1;
        } else if let Some(lmaj) = h.value(&format!("{up}_MIN_VER_MAJOR")) {
            let lmin = h.value(&format!("{up}_MIN_VER_MINOR")).unwrap();
            assert!(
                (maj as i64, min as i64) >= (lmaj, lmin),
                "{up} below Linux's minimum"
            );
            compared += 1;
        }
    }

    // The header word: byte positions of struct mc_cmd_header.
    let hdr = h
        .structs
        .get("mc_cmd_header")
        .expect("struct mc_cmd_header");
    let want = [
        ("src_id", 0),
        ("flags_hw", 1),
        ("status", 2),
        ("flags_sw", 3),
        ("token", 4),
        ("cmd_id", 6),
    ];
    for (f, off) in want {
        assert!(
            hdr.iter().any(|(n, o, _)| n == f && *o == off),
            "mc_cmd_header.{f}"
        );
        compared += 1;
    }
    let hw = nestio_emulated::fsl_mc::Header {
        src_id: 1,
        flags_hw: 2,
        status: 3,
        flags_sw: 4,
        token: 0x0605,
        cmd_id: CmdId::from_raw(0x0807),
    }
    .encode()
    .to_le_bytes();
    assert_eq!(hw, [1, 2, 3, 4, 5, 6, 7, 8], "header bytes in struct order");

    // Every parameter offset nestio encodes.
    for (s, f, off) in layout::ALL {
        let fields = h
            .structs
            .get(*s)
            .unwrap_or_else(|| panic!("struct {s} not found in Linux's headers"));
        let (_, loff, size) = fields
            .iter()
            .find(|(n, _, _)| n == f)
            .unwrap_or_else(|| panic!("{s}.{f} not found"));
        assert_eq!(loff, off, "{s}.{f}: Linux offset {loff}, nestio {off}");
        assert!(loff + size <= 56, "{s}.{f} fits the parameters");
        compared += 1;
    }
    assert!(compared > 150, "only {compared} values compared");

    // The other direction: every command Linux 6.1 defines for the DPRC, DPMCP, DPBP,
    // DPCON, DPIO and DPMAC is implemented (answered with anything but UNSUPPORTED_OP),
    // except the few listed here, which must stay unsupported.
    let unimplemented = [
        "DPIO_CMDID_SET_STASHING_DEST",
        "DPCON_CMDID_SET_NOTIFICATION",
        "DPMAC_CMDID_SET_LINK_STATE",
        "DPMAC_CMDID_GET_COUNTER",
        "DPMAC_CMDID_SET_PROTOCOL",
    ];
    let objs = nestio_emulated::fsl_mc::parse_object_list("dpio:1,dpbp:1,dpcon:1,dpmcp:1,dpmac:1")
        .unwrap();
    let c = nestio_emulated::fsl_mc::FslMcContainer::new(2, &objs).unwrap();
    let dprc = c.dprc();
    let mut mc = Mc {
        io: RegionPortal {
            dev: &*dprc,
            index: 0,
        },
    };
    let mut implemented = 0;
    for t in [
        ObjType::Dprc,
        ObjType::Dpmcp,
        ObjType::Dpbp,
        ObjType::Dpcon,
        ObjType::Dpio,
        ObjType::Dpmac,
    ] {
        let prefix = format!("{}_CMDID_", t.name().to_uppercase());
        let names: Vec<&String> = h
            .defines
            .keys()
            .filter(|n| n.starts_with(&prefix) && !n.ends_with("_OPEN") && !n.ends_with("_CLOSE"))
            .collect();
        for name in names {
            let id = CmdId::from_raw(h.value(name).unwrap() as u16);
            let token = mc.open(t, if t == ObjType::Dprc { 2 } else { 0 }).unwrap();
            let st = mc.status(id, token, Params::default()).unwrap();
            if unimplemented.contains(&name.as_str()) {
                assert_eq!(
                    st,
                    McStatus::UnsupportedOp,
                    "{name} is implemented now: take it off the list"
                );
            } else {
                assert_ne!(
                    st,
                    McStatus::UnsupportedOp,
                    "{name} ({:#x}) is not implemented",
                    id.raw()
                );
                implemented += 1;
            }
            // Close (the reset above may have closed it already).
            let _ = mc.status(cmd::CLOSE, token, Params::default());
            dprc.reset().unwrap();
        }
    }
    assert!(
        implemented >= 30,
        "only {implemented} Linux commands exercised"
    );
    eprintln!("{implemented} Linux-defined commands implemented");
    if dir.starts_with(std::env::temp_dir()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!("compared {compared} FSL-MC values with Linux 6.1");
}
