//! Interval sets: client addresses of both families, and numbers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::ir::Cidr;

/// Sorted, disjoint, inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Ranges<T: Copy + Ord> {
    pub r: Vec<(T, T)>,
}

pub trait Bound: Copy + Ord + std::fmt::Debug {
    const MIN: Self;
    const MAX: Self;
    fn succ(self) -> Option<Self>;
    fn pred(self) -> Option<Self>;
}

impl Bound for u32 {
    const MIN: u32 = 0;
    const MAX: u32 = u32::MAX;
    fn succ(self) -> Option<u32> {
        self.checked_add(1)
    }
    fn pred(self) -> Option<u32> {
        self.checked_sub(1)
    }
}

impl Bound for u128 {
    const MIN: u128 = 0;
    const MAX: u128 = u128::MAX;
    fn succ(self) -> Option<u128> {
        self.checked_add(1)
    }
    fn pred(self) -> Option<u128> {
        self.checked_sub(1)
    }
}

impl Bound for i64 {
    const MIN: i64 = i64::MIN;
    const MAX: i64 = i64::MAX;
    fn succ(self) -> Option<i64> {
        self.checked_add(1)
    }
    fn pred(self) -> Option<i64> {
        self.checked_sub(1)
    }
}

impl<T: Bound> Ranges<T> {
    pub fn empty() -> Self {
        Ranges { r: Vec::new() }
    }
    pub fn full() -> Self {
        Ranges { r: vec![(T::MIN, T::MAX)] }
    }
    pub fn range(a: T, b: T) -> Self {
        if a <= b {
            Ranges { r: vec![(a, b)] }
        } else {
            Ranges::empty()
        }
    }
    pub fn is_empty(&self) -> bool {
        self.r.is_empty()
    }
    fn normalise(mut v: Vec<(T, T)>) -> Self {
        v.sort();
        let mut out: Vec<(T, T)> = Vec::new();
        for (a, b) in v {
            if let Some(last) = out.last_mut() {
                if last.1.succ().is_none_or(|n| a <= n) {
                    if b > last.1 {
                        last.1 = b;
                    }
                    continue;
                }
            }
            out.push((a, b));
        }
        Ranges { r: out }
    }
    pub fn union(&self, o: &Self) -> Self {
        let mut v = self.r.clone();
        v.extend(o.r.iter().copied());
        Ranges::normalise(v)
    }
    pub fn complement(&self) -> Self {
        let mut out = Vec::new();
        let mut next = Some(T::MIN);
        for &(a, b) in &self.r {
            if let Some(n) = next {
                if n < a {
                    if let Some(p) = a.pred() {
                        out.push((n, p));
                    }
                }
            }
            next = b.succ();
        }
        if let Some(n) = next {
            out.push((n, T::MAX));
        }
        Ranges { r: out }
    }
    pub fn intersect(&self, o: &Self) -> Self {
        self.complement().union(&o.complement()).complement()
    }
    pub fn contains(&self, x: T) -> bool {
        self.r.iter().any(|(a, b)| *a <= x && x <= *b)
    }
    pub fn first(&self) -> Option<T> {
        self.r.first().map(|r| r.0)
    }
}

/// A set of client addresses: IPv4, and IPv6 outside the IPv4-mapped range (addresses
/// are canonical: a mapped address is its IPv4 address, as the runtime has them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpSet {
    pub v4: Ranges<u32>,
    pub v6: Ranges<u128>,
}

const MAPPED: (u128, u128) = (0xffff_0000_0000, 0xffff_ffff_ffff);

impl IpSet {
    pub fn empty() -> IpSet {
        IpSet { v4: Ranges::empty(), v6: Ranges::empty() }
    }
    pub fn full() -> IpSet {
        IpSet { v4: Ranges::full(), v6: Ranges::full().intersect(&Ranges::range(MAPPED.0, MAPPED.1).complement()) }
    }
    pub fn of_cidr(c: &Cidr) -> IpSet {
        let mut s = IpSet::empty();
        match c.addr {
            IpAddr::V4(a) => {
                let mask = if c.prefix == 0 { 0 } else { u32::MAX << (32 - c.prefix.min(32)) };
                let lo = u32::from(a) & mask;
                s.v4 = Ranges::range(lo, lo | !mask);
            }
            IpAddr::V6(a) => {
                let mask = if c.prefix == 0 { 0 } else { u128::MAX << (128 - c.prefix.min(128)) };
                let lo = u128::from(a) & mask;
                let r = Ranges::range(lo, lo | !mask);
                s.v6 = r.intersect(&Ranges::range(MAPPED.0, MAPPED.1).complement());
                // A network inside the mapped range stands for IPv4 addresses (Cidr::contains
                // does not match them, but the runtime never sees a mapped client address).
            }
        }
        s
    }
    pub fn of_cidrs<'a>(cs: impl IntoIterator<Item = &'a Cidr>) -> IpSet {
        cs.into_iter().fold(IpSet::empty(), |a, c| a.union(&IpSet::of_cidr(c)))
    }
    pub fn single(ip: IpAddr) -> IpSet {
        IpSet::of_cidr(&Cidr { addr: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } })
    }
    pub fn union(&self, o: &IpSet) -> IpSet {
        IpSet { v4: self.v4.union(&o.v4), v6: self.v6.union(&o.v6) }
    }
    pub fn intersect(&self, o: &IpSet) -> IpSet {
        IpSet { v4: self.v4.intersect(&o.v4), v6: self.v6.intersect(&o.v6) }
    }
    pub fn complement(&self) -> IpSet {
        IpSet::full().intersect(&IpSet { v4: self.v4.complement(), v6: self.v6.complement() })
    }
    pub fn minus(&self, o: &IpSet) -> IpSet {
        self.intersect(&o.complement())
    }
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(a.into()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.v4.contains(v4.into()),
                None => self.v6.contains(a.into()),
            },
        }
    }
    /// An address of the set, preferring documentation addresses an attacker example
    /// would use, then ordinary public ones, IPv4 before IPv6.
    pub fn pick(&self) -> Option<IpAddr> {
        let prefer = [
            "198.51.100.23",
            "203.0.113.77",
            "192.0.2.200",
            "185.199.108.9",
            "45.33.32.156",
            "100.64.7.7",
            "2001:db8::23",
            "2001:db8:ffff::77",
        ];
        for p in prefer {
            if let Ok(ip) = p.parse::<IpAddr>() {
                if self.contains(ip) {
                    return Some(ip);
                }
            }
        }
        // Avoid network and broadcast-looking addresses where the range allows.
        for &(a, b) in &self.v4.r {
            let x = if b > a.saturating_add(1) { a + 1 } else { a };
            return Some(IpAddr::V4(Ipv4Addr::from(x)));
        }
        for &(a, b) in &self.v6.r {
            let x = if b > a.saturating_add(1) { a + 1 } else { a };
            return Some(IpAddr::V6(Ipv6Addr::from(x)));
        }
        None
    }
    /// Whether the set covers a network wider than a deliberate trust declaration.
    pub fn size_hint(&self) -> (u128, u128) {
        let v4: u128 = self.v4.r.iter().map(|(a, b)| (*b as u128) - (*a as u128) + 1).sum();
        let v6: u128 = self.v6.r.iter().fold(0u128, |acc, (a, b)| acc.saturating_add((b - a).saturating_add(1)));
        (v4, v6)
    }
}

/// Numbers: integer ranges (every numeric fact but the spam score is an integer; a score
/// compared with a fraction is scaled by the caller).
pub type NumSet = Ranges<i64>;

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn sets() {
        let a = IpSet::of_cidr(&c("10.0.0.0/8"));
        assert!(a.contains("10.1.2.3".parse().unwrap()));
        assert!(!a.contains("11.0.0.0".parse().unwrap()));
        let all = IpSet::full();
        let rest = all.minus(&a);
        assert!(!rest.contains("10.0.0.1".parse().unwrap()));
        assert!(rest.contains("::1".parse().unwrap()));
        assert!(rest.contains("::ffff:11.0.0.1".parse().unwrap()));
        assert!(!rest.contains("::ffff:10.0.0.1".parse().unwrap()));
        let wide = IpSet::of_cidr(&c("0.0.0.0/2"));
        assert!(wide.contains("45.33.32.156".parse().unwrap()));
        let v6 = IpSet::of_cidr(&c("2000::/4"));
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(IpSet::empty().is_empty());
        assert_eq!(all.minus(&all), IpSet::empty());
    }

    #[test]
    fn numbers() {
        let a = NumSet::range(0, 10);
        let b = NumSet::range(5, 20);
        assert_eq!(a.intersect(&b), NumSet::range(5, 10));
        assert_eq!(a.union(&b), NumSet::range(0, 20));
        assert_eq!(NumSet::full().complement(), NumSet::empty());
    }
}
