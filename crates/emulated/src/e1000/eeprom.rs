//! The 64-word Microwire EEPROM of the 82540EM.
//!
//! Contents ([`Eeprom::new`]): a full factory image of an 82540EM card as the 8254x
//! manual's EEPROM map (section 5.6) lays it out — the MAC address in words 0-2 (low
//! byte first), the compatibility and OEM words, the PBA number (words 8-9),
//! initialization control words 1, 2 and 3 (0x0A, 0x0F, 0x24), the subsystem ID and
//! subsystem vendor ID (0x0B, 0x0C) that the PCI configuration space shows, device and
//! vendor ID (0x0D, 0x0E), the software-defined pin and PHY / boot agent words, and
//! word 0x3F chosen so that words 0x00-0x3F sum to 0xBABA (the checksum drivers
//! verify, section 5.6.35). Two read paths exist, as on the chip:
//! - EERD: write START with an address, read back DONE and the data at once;
//! - EECD bit-banging (what Linux's e1000 uses on the 82540): the driver toggles chip
//!   select (CS), clock (SK) and data-in (DI) and samples data-out (DO). [`Microwire`]
//!   decodes the READ opcode (start bit 1, opcode 10) followed by a 6-bit address and
//!   then shifts out a dummy 0 and 16 data bits per word, MSB first, continuing into
//!   the next word while CS stays high. Other opcodes (write/erase) are ignored: the
//!   EEPROM is read-only to the guest.

/// Number of 16-bit words.
pub const EEPROM_WORDS: usize = 64;
/// The sum all words must have.
pub const EEPROM_SUM: u16 = 0xBABA;
/// Index of the checksum word.
pub const CHECKSUM_WORD: usize = 0x3F;

/// Word holding the subsystem ID.
pub const WORD_SUBSYS_ID: usize = 0x0B;
/// Word holding the subsystem vendor ID.
pub const WORD_SUBSYS_VENDOR: usize = 0x0C;

/// The default image, words 0x00-0x3F (MAC and checksum filled in by [`Eeprom::new`]).
/// The values are those of an 82540EM adapter's factory image, laid out as the
/// manual's section 5.6 describes:
/// - 0x03 compatibility 0x0000; 0x04 OEM LED configuration 0xFFFF (unused: LEDCTL keeps
///   its hardware default); 0x05 image version; 0x06-0x07 OEM words;
/// - 0x08-0x09 PBA number 300010-00x (word 8 = 0x3000, word 9 = 0x1000);
/// - 0x0A initialization control 1 = 0x6403: signature 01b (bits 15:14, the image is
///   valid), load subsystem IDs (bit 1) and device IDs (bit 0);
/// - 0x0B-0x0E subsystem ID 0x100E, subsystem vendor 0x8086, device ID 0x100E, vendor
///   0x8086;
/// - 0x0F initialization control 2 = 0x3040: PAUSE and ASM_DIR (bits 13:12, symmetric
///   and asymmetric flow control advertised), APM PME# enable (bit 6);
/// - 0x10-0x23: software-defined pins control, PHY and power management words;
///   0x24 initialization control 3 (port A) = 0x4D01;
/// - 0x30-0x32 boot agent (PXE) words; other words unused (0xFFFF).
pub const DEFAULT_IMAGE: [u16; EEPROM_WORDS] = [
    0x0000, 0x0000, 0x0000, 0x0000, 0xFFFF, 0x0000, 0x0000, 0x0000, // 0x00
    0x3000, 0x1000, 0x6403, 0x100E, 0x8086, 0x100E, 0x8086, 0x3040, // 0x08
    0x0008, 0x2000, 0x7E14, 0x0048, 0x1000, 0x00D8, 0x0000, 0x2700, // 0x10
    0x6CC9, 0x3150, 0x0722, 0x040B, 0x0984, 0x0000, 0xC000, 0x0706, // 0x18
    0x1008, 0x0000, 0x0F04, 0x7FFF, 0x4D01, 0xFFFF, 0xFFFF, 0xFFFF, // 0x20
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, // 0x28
    0x0100, 0x4000, 0x121C, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, // 0x30
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0x0000, // 0x38
];

/// The EEPROM image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eeprom {
    words: [u16; EEPROM_WORDS],
}

impl Eeprom {
    /// The default image holding `mac`, with a valid checksum (see the module
    /// documentation and [`DEFAULT_IMAGE`]).
    pub fn new(mac: [u8; 6]) -> Self {
        let mut words = DEFAULT_IMAGE;
        for i in 0..3 {
            words[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
        }
        let mut e = Eeprom { words };
        e.fix_checksum();
        e
    }

    /// Subsystem vendor ID and subsystem ID (words 0x0C and 0x0B), which the chip loads
    /// into its PCI configuration space when initialization control word 1 says so.
    pub fn subsystem(&self) -> (u16, u16) {
        (self.words[WORD_SUBSYS_VENDOR], self.words[WORD_SUBSYS_ID])
    }

    /// Rewrite the checksum word.
    pub fn fix_checksum(&mut self) {
        let sum = self.words[..CHECKSUM_WORD]
            .iter()
            .fold(0u16, |a, w| a.wrapping_add(*w));
        self.words[CHECKSUM_WORD] = EEPROM_SUM.wrapping_sub(sum);
    }

    /// Word `addr`, 0 for addresses past the end.
    pub fn word(&self, addr: usize) -> u16 {
        self.words.get(addr).copied().unwrap_or(0)
    }

    /// The MAC address held in words 0-2.
    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        for i in 0..3 {
            m[2 * i..2 * i + 2].copy_from_slice(&self.words[i].to_le_bytes());
        }
        m
    }

    /// All words.
    pub fn words(&self) -> &[u16; EEPROM_WORDS] {
        &self.words
    }

    /// An image from raw words (migration); the checksum is kept as given.
    pub fn from_words(words: [u16; EEPROM_WORDS]) -> Self {
        Eeprom { words }
    }
}

/// Microwire bit-bang decoder state (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Microwire {
    /// Bits shifted in since CS rose.
    pub in_bits: u8,
    /// The bits shifted in.
    pub in_val: u16,
    /// A READ is in progress.
    pub reading: bool,
    /// Bit position of DO in the word stream (word * 16 + bit), valid while reading.
    pub out_pos: u16,
    /// The dummy bit has been shifted out.
    pub started: bool,
    /// Last SK level.
    pub sk: bool,
}

/// Address bits of a 64-word part.
const ADDR_BITS: u8 = 6;
/// Start bit + 2 opcode bits + address.
const CMD_BITS: u8 = 3 + ADDR_BITS;
/// Start bit and READ opcode.
const READ_CMD: u16 = 0b110;

impl Microwire {
    /// Apply new pin levels; returns the DO level.
    pub fn clock(&mut self, eeprom: &Eeprom, cs: bool, sk: bool, di: bool) -> bool {
        if !cs {
            *self = Microwire {
                sk,
                ..Default::default()
            };
            return false;
        }
        let rising = sk && !self.sk;
        self.sk = sk;
        if rising {
            if self.reading {
                if self.started {
                    self.out_pos = (self.out_pos + 1) % (EEPROM_WORDS as u16 * 16);
                } else {
                    self.started = true;
                }
            } else if self.in_bits < CMD_BITS {
                self.in_val = (self.in_val << 1) | u16::from(di);
                self.in_bits += 1;
                // A start bit must come first: leading zeros are ignored.
                if self.in_bits == 1 && self.in_val == 0 {
                    self.in_bits = 0;
                }
                if self.in_bits == CMD_BITS && (self.in_val >> ADDR_BITS) == READ_CMD {
                    self.reading = true;
                    self.started = false;
                    self.out_pos = (self.in_val & ((1 << ADDR_BITS) - 1)) * 16;
                }
            }
        }
        self.dout(eeprom)
    }

    /// Current DO level.
    pub fn dout(&self, eeprom: &Eeprom) -> bool {
        if !self.reading || !self.started {
            return false;
        }
        let word = eeprom.word(usize::from(self.out_pos / 16));
        word & (0x8000 >> (self.out_pos % 16)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_and_mac() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let e = Eeprom::new(mac);
        let sum = e.words().iter().fold(0u16, |a, w| a.wrapping_add(*w));
        assert_eq!(sum, EEPROM_SUM);
        assert_eq!(e.mac(), mac);
        assert_eq!(e.word(0), 0x5452);
        assert_eq!(e.word(64), 0);
        // The factory words are all there: the signature of init control 1, the ids.
        assert_eq!(e.word(0x0A) >> 14, 0b01, "init control 1 signature");
        assert_eq!(e.subsystem(), (0x8086, 0x100E));
        assert_eq!((e.word(0x0D), e.word(0x0E)), (0x100E, 0x8086));
        assert_eq!(e.word(0x0F) & 0x3000, 0x3000, "flow control advertised");
        let other = Eeprom::new([2, 0, 0, 0, 0, 1]);
        assert_ne!(other.word(CHECKSUM_WORD), e.word(CHECKSUM_WORD));
        assert_eq!(other.words()[3..0x3F], e.words()[3..0x3F]);
    }

    fn bitbang_read(e: &Eeprom, addr: u16) -> u16 {
        let mut m = Microwire::default();
        m.clock(e, false, false, false);
        let send = |m: &mut Microwire, bit: bool| {
            m.clock(e, true, false, bit);
            m.clock(e, true, true, bit);
            m.clock(e, true, false, bit);
        };
        for b in [true, true, false] {
            send(&mut m, b);
        }
        for i in (0..6).rev() {
            send(&mut m, addr & (1 << i) != 0);
        }
        let mut v = 0u16;
        for _ in 0..16 {
            let d = m.clock(e, true, true, false);
            v = (v << 1) | u16::from(d);
            m.clock(e, true, false, false);
        }
        v
    }

    #[test]
    fn microwire_read_matches_words() {
        let e = Eeprom::new([1, 2, 3, 4, 5, 6]);
        for a in [0u16, 1, 2, 0x0B, 0x3F] {
            assert_eq!(bitbang_read(&e, a), e.word(a as usize), "word {a:#x}");
        }
    }
}
