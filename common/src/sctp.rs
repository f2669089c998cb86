//! SCTP's CRC32c checksum (RFC 9260, appendix A), updated incrementally when a rewrite changes
//! the ports.
//!
//! SCTP has no pseudo-header: changing an address leaves the checksum as it is. Changing a
//! port does change it, and the CRC covers the whole packet, so recomputing it would read every
//! byte. A CRC is linear over GF(2) instead: for two messages of the same length,
//! `crc(m ^ d) = crc(m) ^ raw(d)`, where `raw` is the CRC without its initial value and final
//! complement. A port rewrite's `d` is the XOR of the old and new port word followed by zeros
//! up to the packet's end, and `raw` of that is the port word's raw CRC multiplied by
//! `x^(8 * trailing bytes)` modulo the polynomial. [`port_rewrite_delta`] computes it with
//! three 256-entry tables and two multiplications: a short path without branches on the data
//! (what the eBPF verifier wants), whatever the packet's length.
//!
//! Values are in the CRC's reflected representation (the bit for `x^0` is bit 31), which is
//! also how the checksum field reads as a little-endian `u32`: XOR the delta into the field
//! read that way.

/// CRC32c's polynomial (Castagnoli), reflected.
const POLY: u32 = 0x82f6_3b78;

/// Offset of the checksum in the SCTP common header.
pub const CHECKSUM_OFFSET: usize = 8;

/// `a * b` modulo the polynomial, both reflected.
#[inline(always)]
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut i = 0;
    while i < 32 {
        // Branch-free: the masks are all ones when the bit is set.
        product ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    product
}

/// `x^(2^k)` modulo the polynomial.
const fn x_pow_2k(k: u32) -> u32 {
    // x^1: the bit for x^1 is bit 30 in the reflected representation.
    let mut power = 1 << 30;
    let mut i = 0;
    while i < k {
        power = mul_mod(power, power);
        i += 1;
    }
    power
}

/// `table[i] = step^i` modulo the polynomial, for `i` in `0..256`.
const fn powers(step: u32) -> [u32; 256] {
    // x^0 = 1.
    let mut table = [1 << 31; 256];
    let mut i = 1;
    while i < 256 {
        table[i] = mul_mod(table[i - 1], step);
        i += 1;
    }
    table
}

/// `x^(8 * i)`: what `i` zero bytes do to a raw CRC.
static ZEROS_LOW: [u32; 256] = powers(x_pow_2k(3));
/// `x^(8 * 256 * i)`: what `256 * i` zero bytes do.
static ZEROS_HIGH: [u32; 256] = powers(x_pow_2k(11));

/// The byte-at-a-time table: the raw CRC of one byte.
static BYTE_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = (crc >> 1) ^ (POLY & 0u32.wrapping_sub(crc & 1));
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The raw CRC of four bytes read as a little-endian `u32`.
#[inline(always)]
fn raw_word(word: u32) -> u32 {
    let mut crc = word;
    let mut i = 0;
    while i < 4 {
        crc = (crc >> 8) ^ BYTE_TABLE[(crc & 0xff) as usize];
        i += 1;
    }
    crc
}

/// `x^(8 * bytes)` modulo the polynomial: what `bytes` zero bytes do to a raw CRC. Two table
/// lookups and one multiplication, so the eBPF verifier walks a short, fixed path.
#[inline(always)]
fn zeros(bytes: u16) -> u32 {
    mul_mod(ZEROS_LOW[usize::from(bytes & 0xff)], ZEROS_HIGH[usize::from(bytes >> 8)])
}

/// What to XOR into the checksum (read as a little-endian `u32`) of an SCTP packet of
/// `sctp_len` bytes (common header and chunks) whose first four bytes, the ports, change from
/// `old_ports` to `new_ports` (both read as little-endian `u32`, i.e. as they lie in memory on
/// a little-endian machine).
#[inline(always)]
pub fn port_rewrite_delta(old_ports: u32, new_ports: u32, sctp_len: u16) -> u32 {
    mul_mod(zeros(sctp_len.saturating_sub(4)), raw_word(old_ports ^ new_ports))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit by bit, straight from the definition: initial value all ones, final complement.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn the_reference_crc_has_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    /// A packet whose checksum is patched with the delta equals one computed from scratch, for
    /// lengths across the whole range and both ports changing.
    #[test]
    fn the_delta_matches_a_full_recomputation() {
        let mut seed = 0x1234_5678u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [12usize, 13, 16, 32, 33, 100, 255, 256, 1000, 1480, 9000, 65_535] {
            let mut packet = [0u8; 65_535];
            let packet = &mut packet[..len];
            packet.iter_mut().for_each(|byte| *byte = next() as u8);
            packet[8..12].fill(0);
            let before = crc32c(packet);
            let old = u32::from_le_bytes(packet[..4].try_into().unwrap());
            let new = next();
            packet[..4].copy_from_slice(&new.to_le_bytes());
            let after = crc32c(packet);
            assert_eq!(before ^ port_rewrite_delta(old, new, len as u16), after, "len {len}");
        }
    }

    #[test]
    fn unchanged_ports_give_no_delta() {
        assert_eq!(port_rewrite_delta(0xdead_beef, 0xdead_beef, 1500), 0);
    }
}
