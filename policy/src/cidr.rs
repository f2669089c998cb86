//! IP prefixes (`10.0.0.0/8`, `fd00::/64`) as used by `ipBlock.cidr` and `ipBlock.except`.
use std::{fmt, net::IpAddr, str::FromStr};

use thiserror::Error;

/// An IP prefix with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("`{text}` is not a CIDR: write an address, a slash and a prefix length (10.0.0.0/8)")]
    Syntax { text: String },
    #[error("`{text}`: prefix length {len} is longer than the address ({max} bits)")]
    Length { text: String, len: u32, max: u8 },
}

impl Cidr {
    /// The prefix of `len` bits containing `addr` (host bits are cleared).
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = max_len(addr);
        if len > max {
            return None;
        }
        Some(Self { addr: mask(addr, len), len })
    }

    /// The single-address prefix of `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: max_len(addr) }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies in this prefix (an address of the other family never does).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// The highest address of this prefix.
    pub fn last(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(v4) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) | host).into())
            }
            IpAddr::V6(v6) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) | host).into())
            }
        }
    }

    /// Whether every address of `other` lies in this prefix.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains_ip(other.addr)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6((bits & keep).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// Parses `addr/len`; host bits may be set and are cleared, as Go's `net.ParseCIDR` does.
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let syntax = || CidrError::Syntax { text: text.to_string() };
        let (addr, len) = text.trim().split_once('/').ok_or_else(syntax)?;
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let len: u32 = len.parse().map_err(|_| syntax())?;
        let max = max_len(addr);
        if len > u32::from(max) {
            return Err(CidrError::Length { text: text.to_string(), len, max });
        }
        Ok(Self { addr: mask(addr, len as u8), len: len as u8 })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let cidr: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.0.0.0/8");
        assert!(cidr.contains_ip("10.255.0.1".parse().unwrap()));
        assert!(!cidr.contains_ip("11.0.0.1".parse().unwrap()));
        assert!(!cidr.contains_ip("::a00:1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&cidr));
        assert!(!cidr.contains(&all));
        let v6: Cidr = "fd00::1/64".parse().unwrap();
        assert_eq!(v6.to_string(), "fd00::/64");
        assert_eq!(cidr.last().to_string(), "10.255.255.255");
        assert_eq!(all.last().to_string(), "255.255.255.255");
        assert_eq!(Cidr::host(cidr.addr()).last(), cidr.addr());
        assert_eq!(v6.last().to_string(), "fd00::ffff:ffff:ffff:ffff");
    }

    #[test]
    fn rejects_bad_text_with_a_reason() {
        assert!(matches!("10.0.0.0".parse::<Cidr>(), Err(CidrError::Syntax { .. })));
        assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Length { .. })));
        assert!(matches!("ten/8".parse::<Cidr>(), Err(CidrError::Syntax { .. })));
    }
}
