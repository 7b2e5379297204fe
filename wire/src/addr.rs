//! A node's address as the cluster file gives it: `host:port`, where the host
//! is an IP address or a DNS name (Kubernetes gives pods names, not fixed
//! addresses). Names are resolved whenever a node dials, so a peer that comes
//! back with a new address is found again.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl NodeAddr {
    pub fn parse(s: &str) -> Result<NodeAddr, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Ok(NodeAddr::from(a));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}' is not host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{s}': the port '{port}' is not a number from 0 to 65535"))?;
        let ok = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !ok {
            return Err(format!(
                "'{s}': '{host}' is neither an IP address nor a host name"
            ));
        }
        Ok(NodeAddr {
            host: host.to_string(),
            port,
        })
    }

    /// The IP, when the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// Where to listen: the IP itself, or every interface for a host name
    /// (the name is how others reach this node, not something to bind).
    pub fn bind(&self) -> SocketAddr {
        match self.ip() {
            Some(ip) => SocketAddr::new(ip, self.port),
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), self.port),
        }
    }

    /// Resolves the address now (blocking for names).
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        if let Some(ip) = self.ip() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{self} resolves to no address")))
    }

    /// Resolves the address without blocking the runtime.
    pub async fn lookup(&self) -> std::io::Result<SocketAddr> {
        if let Some(ip) = self.ip() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{self} resolves to no address")))
    }
}

impl From<SocketAddr> for NodeAddr {
    fn from(a: SocketAddr) -> NodeAddr {
        NodeAddr {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip() {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl<'de> Deserialize<'de> for NodeAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<NodeAddr, D::Error> {
        let s = String::deserialize(d)?;
        NodeAddr::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_resolve() {
        let a = NodeAddr::parse("127.0.0.1:7000").expect("ip");
        assert_eq!(
            a.resolve().expect("ip"),
            "127.0.0.1:7000".parse().expect("addr")
        );
        assert_eq!(a.bind(), "127.0.0.1:7000".parse().expect("addr"));
        let v6 = NodeAddr::parse("[::1]:9").expect("v6");
        assert_eq!(v6.to_string(), "[::1]:9");
        let n = NodeAddr::parse("p0-0.p0.tandem.svc:7100").expect("name");
        assert_eq!(n.bind(), "0.0.0.0:7100".parse().expect("addr"));
        assert_eq!(n.to_string(), "p0-0.p0.tandem.svc:7100");
        assert_eq!(
            NodeAddr::parse("localhost:80")
                .expect("name")
                .resolve()
                .expect("resolves")
                .port(),
            80
        );
        for bad in ["7000", "host:", "host:99999", ":80", "a b:1", "x..y:1"] {
            assert!(NodeAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
