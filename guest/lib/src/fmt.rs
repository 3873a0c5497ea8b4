//! Integer formatting without SSE: `core`'s decimal `Display` for integers is compiled
//! (in the precompiled `core` of the host target) with SSE instructions that KVM's
//! instruction emulator cannot run, and large values take that path. Print decimal
//! numbers with [`Dec`]; hexadecimal (`{:#x}`) is plain integer code and is fine.

/// Formats a `u64` in decimal with integer instructions only.
pub struct Dec(pub u64);

impl core::fmt::Display for Dec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = self.0;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        // Digits are ASCII.
        f.write_str(core::str::from_utf8(&buf[i..]).unwrap_or("?"))
    }
}
