//! IP prefixes (`10.244.1.0/24`, `fd00::/120`) as integers, for the allocator's arithmetic.
use std::{fmt, net::IpAddr, str::FromStr};

/// An address with a prefix length; `addr` may have host bits set (see [`IpNet::network`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    pub fn bits(&self) -> u8 {
        if self.is_v4() { 32 } else { 128 }
    }

    /// The first address of the prefix as an integer.
    pub fn first(&self) -> u128 {
        let host_bits = u32::from(self.bits() - self.prefix);
        let mask = if host_bits >= 128 { 0 } else { !0u128 << host_bits };
        to_int(self.addr) & mask
    }

    /// The last address of the prefix as an integer.
    pub fn last(&self) -> u128 {
        let host_bits = u32::from(self.bits() - self.prefix);
        let span = if host_bits >= 128 { !0u128 } else { (1u128 << host_bits) - 1 };
        self.first() | span
    }

    pub fn network(&self) -> IpNet {
        IpNet { addr: from_int(self.first(), self.is_v4()), prefix: self.prefix }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_v4() && (self.first()..=self.last()).contains(&to_int(ip))
    }
}

pub fn to_int(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_int(value: u128, v4: bool) -> IpAddr {
    if v4 { IpAddr::from((value as u32).to_be_bytes()) } else { IpAddr::from(value.to_be_bytes()) }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a prefix like 10.0.0.0/24"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?}: bad address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{text:?}: bad prefix length"))?;
        let net = IpNet { addr, prefix };
        if prefix > net.bits() {
            return Err(format!("{text:?}: prefix length {prefix} is too long"));
        }
        Ok(net)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_span_their_range() {
        let net: IpNet = "10.1.2.77/24".parse().unwrap();
        assert_eq!(net.network().to_string(), "10.1.2.0/24");
        assert_eq!(from_int(net.last(), true).to_string(), "10.1.2.255");
        assert!(net.contains("10.1.2.1".parse().unwrap()));
        assert!(!net.contains("10.1.3.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let v6: IpNet = "fd00::/120".parse().unwrap();
        assert_eq!(from_int(v6.last(), false).to_string(), "fd00::ff");
        let all: IpNet = "::/0".parse().unwrap();
        assert_eq!(all.last(), u128::MAX);
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.0".parse::<IpNet>().is_err());
        assert!("x/8".parse::<IpNet>().is_err());
    }
}
