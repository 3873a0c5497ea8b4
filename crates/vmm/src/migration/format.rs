//! The VM migration stream: a header, then sections, each framed and checksummed.
//!
//! ```text
//! header   : magic "NESTIOVM" (8 bytes) | version u32 | flags u32 (0)
//! section  : tag u32 | instance u32 | length u32 | payload (length bytes) | crc32 u32
//! ```
//!
//! All integers little-endian. The CRC-32 (IEEE) covers tag, instance, length and the
//! payload, so a flipped bit anywhere in a section is caught before its payload is
//! looked at. A section's length is bounded by [`MAX_SECTION`] *before* any allocation.
//! An unknown tag, a version other than [`STREAM_VERSION`] or a non-zero flags word is
//! refused with a message saying what to do: the stream is parsed as hostile input
//! (`fuzz/fuzz_targets/vm_migration.rs`).
//!
//! Payloads per tag ([`Tag`]) are described in `ARCHITECTURE.md` ("VM migration") and
//! decoded by [`super::state`].

use std::io::{Read, Write};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"NESTIOVM";
/// The stream version this nestio writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Largest section payload (a RAM run of 1 MiB plus its address; device chunks and
/// vCPU states are smaller).
pub const MAX_SECTION: u32 = (1 << 20) + 64;
/// Bytes of the stream header.
pub const HEADER_LEN: usize = 16;

/// Errors of the stream format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The transport failed (connection closed, timeout).
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Not a nestio VM migration stream.
    #[error("not a nestio VM migration stream (magic {0:02x?}); point --migrate-listen / --to at a nestio peer")]
    Magic([u8; 8]),
    /// A version this nestio cannot read.
    #[error("migration stream version {got} is not supported (this nestio reads version {STREAM_VERSION}); migrate between nestio builds with the same stream version")]
    Version {
        /// Version in the stream.
        got: u32,
    },
    /// Header flags this version does not define.
    #[error("migration stream header flags {0:#x} are not defined in version {STREAM_VERSION}; the peer is a different nestio build")]
    Flags(u32),
    /// A section longer than any this version writes.
    #[error("migration section {tag:#x} announces {len} bytes (at most {MAX_SECTION}); the stream is corrupt")]
    TooLong {
        /// Tag.
        tag: u32,
        /// Announced length.
        len: u32,
    },
    /// An unknown section tag.
    #[error("unknown migration section tag {0:#x}; the peer is a different nestio build")]
    UnknownTag(u32),
    /// The CRC does not match.
    #[error(
        "migration section {tag:?} (instance {instance}) fails its checksum: the stream is corrupt"
    )]
    Checksum {
        /// Tag.
        tag: Tag,
        /// Instance.
        instance: u32,
    },
    /// A payload of the wrong shape.
    #[error("migration section {tag:?} (instance {instance}): {reason}")]
    Payload {
        /// Tag.
        tag: Tag,
        /// Instance.
        instance: u32,
        /// What is wrong.
        reason: String,
    },
}

/// Section kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Tag {
    /// The machine's shape: RAM size, vCPUs, assigned devices (checked first).
    Config = 1,
    /// A run of guest RAM pages: `gpa u64` then whole 4 KiB pages.
    Ram = 2,
    /// A chunk of a device's own migration stream (instance = PCI slot).
    DeviceData = 3,
    /// The full state of one vCPU (instance = vCPU index).
    Vcpu = 4,
    /// The in-kernel PIC master, PIC slave and IOAPIC.
    Irqchip = 5,
    /// The in-kernel PIT.
    Pit = 6,
    /// The KVM clock.
    Clock = 7,
    /// The 16550 console.
    Serial = 8,
    /// An assigned PCI function's virtualised configuration (instance = slot).
    Pci = 9,
    /// End of one device's stream (instance = slot, payload: total bytes u64).
    DeviceEnd = 10,
    /// End of the stream.
    End = 0xffff,
}

impl Tag {
    /// From the wire value.
    pub fn from_u32(v: u32) -> Option<Tag> {
        Some(match v {
            1 => Tag::Config,
            2 => Tag::Ram,
            3 => Tag::DeviceData,
            4 => Tag::Vcpu,
            5 => Tag::Irqchip,
            6 => Tag::Pit,
            7 => Tag::Clock,
            8 => Tag::Serial,
            9 => Tag::Pci,
            10 => Tag::DeviceEnd,
            0xffff => Tag::End,
            _ => return None,
        })
    }
}

/// One decoded section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Kind.
    pub tag: Tag,
    /// Which component (vCPU index, PCI slot; 0 otherwise).
    pub instance: u32,
    /// Payload (checked against its CRC).
    pub payload: Vec<u8>,
}

fn crc(tag: u32, instance: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&tag.to_le_bytes());
    h.update(&instance.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Writes a stream; counts the bytes written.
pub struct StreamWriter<W: Write> {
    w: W,
    bytes: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Write the header.
    pub fn new(mut w: W) -> Result<Self, FormatError> {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        w.write_all(&h)?;
        Ok(StreamWriter {
            w,
            bytes: HEADER_LEN as u64,
        })
    }

    /// Write one section (its payload at most [`MAX_SECTION`] bytes).
    pub fn section(&mut self, tag: Tag, instance: u32, payload: &[u8]) -> Result<(), FormatError> {
        self.section_parts(tag, instance, &[payload])
    }

    /// Write one section whose payload is the concatenation of `parts`.
    pub fn section_parts(
        &mut self,
        tag: Tag,
        instance: u32,
        parts: &[&[u8]],
    ) -> Result<(), FormatError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_SECTION)
            .ok_or(FormatError::TooLong {
                tag: tag as u32,
                len: u32::try_from(len).unwrap_or(u32::MAX),
            })?;
        let mut h = crc32fast::Hasher::new();
        h.update(&(tag as u32).to_le_bytes());
        h.update(&instance.to_le_bytes());
        h.update(&len32.to_le_bytes());
        let mut head = [0u8; 12];
        head[..4].copy_from_slice(&(tag as u32).to_le_bytes());
        head[4..8].copy_from_slice(&instance.to_le_bytes());
        head[8..].copy_from_slice(&len32.to_le_bytes());
        self.w.write_all(&head)?;
        for p in parts {
            h.update(p);
            self.w.write_all(p)?;
        }
        self.w.write_all(&h.finalize().to_le_bytes())?;
        self.bytes += 16 + len as u64;
        Ok(())
    }

    /// Flush the transport.
    pub fn flush(&mut self) -> Result<(), FormatError> {
        Ok(self.w.flush()?)
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads a stream as hostile input.
pub struct StreamReader<R: Read> {
    r: R,
    bytes: u64,
}

impl<R: Read> StreamReader<R> {
    /// Read and check the header.
    pub fn new(mut r: R) -> Result<Self, FormatError> {
        let mut h = [0u8; HEADER_LEN];
        r.read_exact(&mut h)?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&h[..8]);
        if magic != MAGIC {
            return Err(FormatError::Magic(magic));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != STREAM_VERSION {
            return Err(FormatError::Version { got: version });
        }
        let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags != 0 {
            return Err(FormatError::Flags(flags));
        }
        Ok(StreamReader {
            r,
            bytes: HEADER_LEN as u64,
        })
    }

    /// The next section (checked: known tag, bounded length, CRC).
    pub fn next_section(&mut self) -> Result<Section, FormatError> {
        let mut head = [0u8; 12];
        self.r.read_exact(&mut head)?;
        let w = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let (tag_raw, instance, len) = (w(0), w(4), w(8));
        if len > MAX_SECTION {
            return Err(FormatError::TooLong { tag: tag_raw, len });
        }
        let tag = Tag::from_u32(tag_raw).ok_or(FormatError::UnknownTag(tag_raw))?;
        let mut payload = vec![0u8; len as usize];
        self.r.read_exact(&mut payload)?;
        let mut c = [0u8; 4];
        self.r.read_exact(&mut c)?;
        if u32::from_le_bytes(c) != crc(tag_raw, instance, &payload) {
            return Err(FormatError::Checksum { tag, instance });
        }
        self.bytes += 16 + u64::from(len);
        Ok(Section {
            tag,
            instance,
            payload,
        })
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// A little-endian cursor over a payload whose every read is bounds-checked.
pub struct Cursor<'a> {
    data: &'a [u8],
    tag: Tag,
    instance: u32,
}

impl<'a> Cursor<'a> {
    /// Over the payload of `s`.
    pub fn new(s: &'a Section) -> Self {
        Cursor {
            data: &s.payload,
            tag: s.tag,
            instance: s.instance,
        }
    }

    /// A payload error for this section.
    pub fn bad(&self, reason: impl Into<String>) -> FormatError {
        FormatError::Payload {
            tag: self.tag,
            instance: self.instance,
            reason: reason.into(),
        }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.data.len() {
            return Err(self.bad(format!(
                "truncated: {n} more bytes needed, {} left",
                self.data.len()
            )));
        }
        let (h, t) = self.data.split_at(n);
        self.data = t;
        Ok(h)
    }

    /// A u8.
    pub fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    /// A u16.
    pub fn u16(&mut self) -> Result<u16, FormatError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A u32.
    pub fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u64.
    pub fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A plain-old-data KVM structure, exactly its size.
    pub fn pod<T: zerocopy::FromBytes>(&mut self) -> Result<T, FormatError> {
        let b = self.take(std::mem::size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| self.bad("structure of the wrong size"))
    }

    /// Bytes left.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// Fail unless every byte was consumed.
    pub fn finish(self) -> Result<(), FormatError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.bad(format!("{} trailing bytes", self.data.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(sections: &[(Tag, u32, Vec<u8>)]) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        for (t, i, p) in sections {
            w.section(*t, *i, p).unwrap();
        }
        w.get_mut().clone()
    }

    #[test]
    fn round_trip_and_counts() {
        let data = stream(&[(Tag::Config, 0, vec![1, 2, 3]), (Tag::End, 0, vec![])]);
        assert_eq!(data.len(), HEADER_LEN + 16 + 3 + 16);
        let mut r = StreamReader::new(&data[..]).unwrap();
        let s = r.next_section().unwrap();
        assert_eq!(
            (s.tag, s.instance, s.payload),
            (Tag::Config, 0, vec![1, 2, 3])
        );
        assert_eq!(r.next_section().unwrap().tag, Tag::End);
        assert_eq!(r.bytes(), data.len() as u64);
        assert!(
            matches!(r.next_section(), Err(FormatError::Io(_))),
            "end of input"
        );
    }

    #[test]
    fn refuses_hostile_headers_and_sections() {
        let good = stream(&[(Tag::Vcpu, 3, vec![9; 40])]);
        let mut v = good.clone();
        v[8] = 2;
        let e = StreamReader::new(&v[..]).err().unwrap();
        assert!(matches!(e, FormatError::Version { got: 2 }), "{e}");
        assert!(e.to_string().contains("same stream version"));
        let mut m = good.clone();
        m[0] = b'X';
        assert!(matches!(
            StreamReader::new(&m[..]).err().unwrap(),
            FormatError::Magic(_)
        ));
        let mut f = good.clone();
        f[12] = 1;
        assert!(matches!(
            StreamReader::new(&f[..]).err().unwrap(),
            FormatError::Flags(1)
        ));
        // A flipped payload bit fails the CRC.
        let mut c = good.clone();
        c[HEADER_LEN + 12 + 5] ^= 1;
        let mut r = StreamReader::new(&c[..]).unwrap();
        assert!(matches!(
            r.next_section(),
            Err(FormatError::Checksum {
                tag: Tag::Vcpu,
                instance: 3
            })
        ));
        // A huge length is refused before any allocation.
        let mut l = good.clone();
        l[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = StreamReader::new(&l[..]).unwrap();
        assert!(matches!(r.next_section(), Err(FormatError::TooLong { .. })));
        let mut t = good.clone();
        t[HEADER_LEN] = 0x77;
        let mut r = StreamReader::new(&t[..]).unwrap();
        assert!(matches!(
            r.next_section(),
            Err(FormatError::UnknownTag(0x77))
        ));
        // Truncated anywhere: an I/O error, never a panic.
        for n in 0..good.len() {
            if let Ok(mut r) = StreamReader::new(&good[..n]) {
                assert!(r.next_section().is_err());
            }
        }
    }

    #[test]
    fn cursor_is_bounded() {
        let s = Section {
            tag: Tag::Pci,
            instance: 1,
            payload: vec![1, 0, 0, 0, 2],
        };
        let mut c = Cursor::new(&s);
        assert_eq!(c.u32().unwrap(), 1);
        assert!(c.u32().is_err());
        assert_eq!(c.u8().unwrap(), 2);
        c.finish().unwrap();
    }
}
