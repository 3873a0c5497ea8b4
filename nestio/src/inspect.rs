//! `nestio inspect`: read a running nested guest's memory by its guest-physical address.
//!
//! The memory comes from the guest's parent level: `--memory-from PATH.mem` (the memory
//! socket of `nestio run --export vfio-user=PATH`) hands over the parent's RAM file and
//! the window that is the nested guest's RAM ([`nestio_vmm::handoff`]). Only that window
//! is mapped ([`nestio_nested::MmapMemory`], volatile accesses), so addresses are the
//! nested guest's own GPAs and nothing outside its memory can be read; an address or
//! length past the window is refused with the window's size. The bytes are printed as a
//! hex dump (16 bytes a line: address, hex, printable ASCII).
//!
//! With `--cr3`, `--addr` is a guest-virtual address translated through the nested
//! guest's own x86-64 page tables rooted at that CR3 (supervisor read), page by page,
//! with `nestio_nested`'s copy API ([`NestedGuests::copy_from_guest`]): a non-canonical
//! address, a translation fault and a page outside the guest's memory each give their own
//! error. A copy that stops part-way prints the bytes it got, then the error (which says
//! how many bytes were copied), and exits 1.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use nestio_nested::{AddressSpace, Cr3, GuestPhysMemory, LevelId, MmapMemory, NestedGuests};
use nestio_vmm::handoff::RamHandoff;

use crate::CmdResult;

/// Largest `--len` accepted.
pub const MAX_LEN: u64 = 1 << 20;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The parent level's memory socket (`PATH.mem` of `nestio run --export vfio-user=PATH`).
    #[arg(long)]
    memory_from: PathBuf,
    /// Address in the nested guest (decimal or 0x hex): guest-physical, or guest-virtual
    /// with --cr3.
    #[arg(long, value_parser = parse_u64)]
    addr: u64,
    /// Translate --addr through the nested guest's page tables at this CR3.
    #[arg(long, value_parser = parse_cr3)]
    cr3: Option<Cr3>,
    /// Bytes to read (at most 1 MiB; K/M suffixes allowed).
    #[arg(long, value_parser = parse_len, default_value = "256")]
    len: u64,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("'{s}' is not an address: use decimal or 0x-prefixed hex"))
}

fn parse_cr3(s: &str) -> Result<Cr3, String> {
    Cr3::new(parse_u64(s)?).ok_or_else(|| format!("CR3 {s} has reserved bits 63:52 set"))
}

fn parse_len(s: &str) -> Result<u64, String> {
    let n = nestio_vmm::parse_size(s).map_err(|e| e.to_string())?;
    if n == 0 || n > MAX_LEN {
        return Err(format!(
            "length {n} is outside 1..={MAX_LEN}: read at most 1M at a time"
        ));
    }
    Ok(n)
}

/// Hex dump of `data` read at `addr`.
pub fn hexdump(addr: u64, data: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        let a = addr.wrapping_add(i as u64 * 16);
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{a:016x}  {:<47}  |{ascii}|\n", hex.join(" ")));
    }
    out
}

pub fn run(args: InspectArgs) -> CmdResult {
    let h = RamHandoff::fetch(&args.memory_from)?;
    let level = h.level;
    let mem = MmapMemory::from_fd(h.fd, h.offset, h.size)?;
    let size = mem.size();
    // The window is the whole memory of the guest we inspect: it is the "host" of a
    // registry with no further levels.
    let guests = NestedGuests::new(mem)?;
    let space = match args.cr3 {
        Some(cr3) => AddressSpace::Virtual { cr3, user: false },
        None => AddressSpace::Physical,
    };
    let len = usize::try_from(args.len).map_err(|_| "length too large")?;
    let mut buf = vec![0u8; len];
    let result = guests.copy_from_guest(LevelId::HOST, space, args.addr, &mut buf);
    let got = match &result {
        Ok(()) => len,
        Err(e) => usize::try_from(e.copied()).unwrap_or(0).min(len),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(hexdump(args.addr, &buf[..got]).as_bytes())?;
    out.flush()?;
    result.map_err(|e| format!("level {level} (memory of {size:#x} bytes): {e}"))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexdump_lines() {
        let d = hexdump(0x7000, b"irq=msi\0ABCDEFGHIJ");
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            "0000000000007000  69 72 71 3d 6d 73 69 00 41 42 43 44 45 46 47 48  |irq=msi.ABCDEFGH|"
        );
        assert!(
            lines[1].starts_with("0000000000007010  49 4a "),
            "{}",
            lines[1]
        );
        assert!(lines[1].ends_with("|IJ|"), "{}", lines[1]);
    }

    #[test]
    fn values_are_checked() {
        assert_eq!(parse_u64("0x7000").unwrap(), 0x7000);
        assert_eq!(parse_u64("28672").unwrap(), 0x7000);
        assert!(parse_u64("0xzz").is_err());
        assert!(parse_u64("-1").is_err());
        assert_eq!(parse_len("4K").unwrap(), 4096);
        assert!(parse_len("0").is_err());
        assert!(parse_len("2M").is_err());
    }
}
