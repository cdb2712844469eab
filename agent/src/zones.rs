//! Zones: the node's own availability zone and a CIDR → zone map for Redis
//! endpoints, so every endpoint is `same_zone`, `cross_zone` or
//! `unknown_zone`. On EKS subnets are per AZ, so the VPC's subnet CIDRs
//! cover pods, nodes and ElastiCache nodes alike.

use std::{net::IpAddr, str::FromStr, sync::Arc};

use ipnet::IpNet;

/// Where an endpoint is relative to this node (the names are the output's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)]
pub enum Locality {
    SameZone,
    CrossZone,
    /// The node's zone or the endpoint's is not configured.
    UnknownZone,
}

/// One `--zone-cidr` entry: `10.0.32.0/19=us-east-1b`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneCidr {
    pub net: IpNet,
    pub zone: String,
}

impl FromStr for ZoneCidr {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        let (cidr, zone) = value.split_once('=').ok_or_else(|| {
            format!("`{value}`: expected CIDR=ZONE, e.g. 10.0.32.0/19=us-east-1b")
        })?;
        let net: IpNet = cidr
            .trim()
            .parse()
            .map_err(|_| format!("`{cidr}` is not a CIDR (e.g. 10.0.32.0/19)"))?;
        let zone = zone.trim();
        if zone.is_empty() {
            return Err(format!("`{value}`: the zone name is empty"));
        }
        Ok(Self {
            // 10.0.32.7/19 means its network.
            net: net.trunc(),
            zone: zone.to_string(),
        })
    }
}

#[derive(Clone, Debug, Default)]
pub struct Zones {
    /// `--zone`.
    node_zone: Option<Arc<str>>,
    /// Longest prefix first, so the most specific entry wins.
    cidrs: Vec<ZoneCidr>,
    /// The Node's zone label, used when `--zone` is not given.
    kube: Option<crate::kube::Names>,
}

impl Zones {
    pub fn new(node_zone: Option<String>, mut cidrs: Vec<ZoneCidr>) -> Self {
        cidrs.sort_by_key(|c| std::cmp::Reverse(c.net.prefix_len()));
        Self {
            node_zone: node_zone.filter(|z| !z.is_empty()).map(Arc::from),
            cidrs,
            kube: None,
        }
    }

    /// Without `--zone`, the node's zone is its `topology.kubernetes.io/zone`
    /// label, once the API has served it.
    pub fn with_node_zone_from(mut self, names: crate::kube::Names) -> Self {
        self.kube = Some(names);
        self
    }

    pub fn node_zone(&self) -> Option<Arc<str>> {
        self.node_zone
            .clone()
            .or_else(|| self.kube.as_ref()?.node_zone())
    }

    /// The configured zone of `ip` (IPv4-mapped IPv6 is looked up as IPv4).
    pub fn zone_of(&self, ip: IpAddr) -> Option<&str> {
        let ip = ip.to_canonical();
        self.cidrs
            .iter()
            .find(|c| c.net.contains(&ip))
            .map(|c| c.zone.as_str())
    }

    /// Where `ip` is relative to this node.
    pub fn locality(&self, ip: IpAddr) -> Locality {
        self.locality_with(ip, |to| self.node_zone().map(|node| &*node == to))
    }

    /// Where `server` is relative to `client`: the client's zone is its
    /// address's configured zone, else the node's (a pod on this node is in
    /// the node's zone; a mapped pod address also covers pods that the
    /// lab, or custom networking, places in another subnet).
    pub fn locality_between(&self, client: IpAddr, server: IpAddr) -> Locality {
        self.locality_with(server, |to| match self.zone_of(client) {
            Some(from) => Some(from == to),
            None => self.node_zone().map(|node| &*node == to),
        })
    }

    /// `same_zone(endpoint's zone)`: whether the viewer's zone is it, `None`
    /// when the viewer's zone is unknown. Asked only for a mapped endpoint,
    /// so without a CIDR map (the common case) no zone is looked up at all
    /// (the node's may take the Kubernetes snapshot's lock).
    fn locality_with(&self, ip: IpAddr, same_zone: impl FnOnce(&str) -> Option<bool>) -> Locality {
        if ip.to_canonical().is_loopback() {
            return Locality::SameZone;
        }
        match self.zone_of(ip).and_then(same_zone) {
            Some(true) => Locality::SameZone,
            Some(false) => Locality::CrossZone,
            None => Locality::UnknownZone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones() -> Zones {
        Zones::new(
            Some("us-east-1a".into()),
            [
                "10.0.0.0/19=us-east-1a",
                "10.0.32.0/19=us-east-1b",
                "10.0.40.0/24=us-east-1c",
                "fd00::/64=us-east-1b",
            ]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect(),
        )
    }

    #[test]
    fn endpoints_are_same_cross_or_unknown_zone() {
        let z = zones();
        assert_eq!(z.locality("10.0.1.5".parse().unwrap()), Locality::SameZone);
        assert_eq!(
            z.locality("10.0.33.5".parse().unwrap()),
            Locality::CrossZone
        );
        assert_eq!(
            z.locality("192.168.1.1".parse().unwrap()),
            Locality::UnknownZone
        );
        assert_eq!(z.locality("127.0.0.1".parse().unwrap()), Locality::SameZone);
        let no_node_zone = Zones::new(None, z.cidrs.clone());
        assert_eq!(
            no_node_zone.locality("10.0.1.5".parse().unwrap()),
            Locality::UnknownZone
        );
    }

    #[test]
    fn a_client_in_a_mapped_subnet_has_its_own_zone() {
        let z = zones();
        let redis_a = "10.0.1.5".parse().unwrap();
        // A client address outside the map is in the node's zone.
        let local = "192.168.7.2".parse().unwrap();
        assert_eq!(z.locality_between(local, redis_a), Locality::SameZone);
        let far = "10.0.33.9".parse().unwrap();
        assert_eq!(z.locality_between(far, redis_a), Locality::CrossZone);
        let far_mapped = "::ffff:10.0.33.9".parse().unwrap();
        assert_eq!(
            z.locality_between(far_mapped, "10.0.34.1".parse().unwrap()),
            Locality::SameZone
        );
        assert_eq!(
            z.locality_between(far, "192.168.1.1".parse().unwrap()),
            Locality::UnknownZone
        );
    }

    #[test]
    fn most_specific_cidr_wins_and_mapped_ipv6_is_ipv4() {
        let z = zones();
        assert_eq!(z.zone_of("10.0.40.9".parse().unwrap()), Some("us-east-1c"));
        assert_eq!(
            z.zone_of("::ffff:10.0.33.5".parse().unwrap()),
            Some("us-east-1b")
        );
        assert_eq!(z.zone_of("fd00::7".parse().unwrap()), Some("us-east-1b"));
    }

    #[test]
    fn bad_entries_are_rejected_with_the_value() {
        for bad in ["10.0.0.0/19", "10.0.0.0/40=a", "x=a", "10.0.0.0/8="] {
            let err = bad.parse::<ZoneCidr>().unwrap_err();
            assert!(err.contains('`'), "{bad}: {err}");
        }
        assert_eq!(
            "10.0.32.7/19=b"
                .parse::<ZoneCidr>()
                .unwrap()
                .net
                .to_string(),
            "10.0.32.0/19"
        );
    }
}
