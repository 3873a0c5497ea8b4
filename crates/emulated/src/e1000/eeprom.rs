//! The 64-word Microwire EEPROM of the 82540EM.
//!
//! Contents: the MAC address in words 0-2 (low byte first), PCI ids in the subsystem
//! words, and word 0x3F chosen so that words 0x00-0x3F sum to 0xBABA (the checksum
//! drivers verify). Two read paths exist, as on the chip:
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

/// The EEPROM image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eeprom {
    words: [u16; EEPROM_WORDS],
}

impl Eeprom {
    /// An image holding `mac` with a valid checksum.
    pub fn new(mac: [u8; 6]) -> Self {
        let mut words = [0u16; EEPROM_WORDS];
        for i in 0..3 {
            words[i] = u16::from_le_bytes([mac[2 * i], mac[2 * i + 1]]);
        }
        // Subsystem device / vendor ids and device / vendor ids as the chip carries them.
        words[0x0B] = 0x100E;
        words[0x0C] = 0x8086;
        words[0x0D] = 0x100E;
        words[0x0E] = 0x8086;
        let mut e = Eeprom { words };
        e.fix_checksum();
        e
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
