//! The test harness for the fleet control plane's store: real etcd clusters
//! (`integration_tests::etcd::EtcdCluster`) that survive a killed leader, and loopback
//! partitions (`integration_tests::partition::LoopbackPartition`) that cut one address off
//! and heal.
//!
//! The etcd tests need no root, only etcd-server and etcd-client (under `CI=true` their
//! absence fails the test); the partition tests need root for nftables. Every wait has a
//! generous deadline that only turns a hang into a failure; nothing asserts on timing.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use enforcer::lab::require_root;
use integration_tests::{
    etcd::{EtcdCluster, etcd_available},
    partition::LoopbackPartition,
};

/// A 3-member cluster keeps serving when its leader is killed: a write through one
/// member is read through another, before and after the new election, and the killed
/// member rejoins with what it missed.
#[test]
fn three_members_survive_a_killed_leader() {
    if !etcd_available("three_members_survive_a_killed_leader") {
        return;
    }
    let started = Instant::now();
    let mut cluster = EtcdCluster::start(3);
    eprintln!("3 members healthy in {:?}", started.elapsed());
    assert_eq!(cluster.endpoints().len(), 3);
    for endpoint in cluster.endpoints() {
        assert!(
            !endpoint.ends_with(":2379") && !endpoint.ends_with(":2380"),
            "{endpoint} is the system etcd's port"
        );
    }

    cluster.put(0, "/enforcer/test/a", "one");
    assert_eq!(cluster.get(1, "/enforcer/test/a").as_deref(), Some("one"));
    assert_eq!(cluster.get(2, "/enforcer/test/missing"), None);

    let old = cluster.leader();
    let killed = Instant::now();
    cluster.kill(old);
    assert!(!cluster.is_running(old));
    let new = cluster.wait_leader(Some(old));
    eprintln!("m{old} killed; m{new} leads after {:?}", killed.elapsed());
    assert_ne!(new, old);
    assert!(cluster.is_running(new));

    let (writer, reader) = {
        let living: Vec<usize> = (0..3).filter(|&i| i != old).collect();
        (living[0], living[1])
    };
    cluster.put(writer, "/enforcer/test/b", "two");
    assert_eq!(
        cluster.get(reader, "/enforcer/test/b").as_deref(),
        Some("two")
    );
    assert_eq!(
        cluster.get(reader, "/enforcer/test/a").as_deref(),
        Some("one")
    );

    cluster.restart(old);
    assert_eq!(cluster.get(old, "/enforcer/test/b").as_deref(), Some("two"));
    cluster.wait_leader(None);
    eprintln!("whole test in {:?}", started.elapsed());
}

/// A single member is its own leader and serves reads and writes.
#[test]
fn one_member_leads_itself() {
    if !etcd_available("one_member_leads_itself") {
        return;
    }
    let cluster = EtcdCluster::start(1);
    assert_eq!(cluster.leader(), 0);
    cluster.put(0, "k", "v");
    assert_eq!(cluster.get(0, "k").as_deref(), Some("v"));
}

/// A test that panics leaves no etcd process and no data behind.
#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if !etcd_available("a_panicking_test_leaves_nothing_behind") {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let result = thread::spawn(move || {
        let cluster = EtcdCluster::start(1);
        tx.send((cluster.dir().to_owned(), cluster.pid(0).unwrap()))
            .unwrap();
        panic!("deliberate panic with a running cluster");
    })
    .join();
    assert!(result.is_err());
    let (dir, pid) = rx.recv().unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
    // Reaped, not a zombie: no /proc entry at all.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "etcd pid {pid} still exists"
    );
}

/// Connecting to a loopback alias works, fails while it is partitioned, and works again
/// once healed.
#[test]
fn loopback_partition_drops_and_heals() {
    if !require_root("loopback_partition_drops_and_heals") {
        return;
    }
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let target = SocketAddr::from(([127, 0, 0, 3], listener.local_addr().unwrap().port()));
    let connects = || TcpStream::connect_timeout(&target, Duration::from_secs(1));

    connects().unwrap_or_else(|e| panic!("connecting to {target} before the partition: {e}"));
    let partition = LoopbackPartition::drop_to(Ipv4Addr::new(127, 0, 0, 3));
    assert!(
        connects().is_err(),
        "{target} reachable through table {}",
        partition.table()
    );
    // Other addresses are not affected.
    let other = SocketAddr::from(([127, 0, 0, 1], target.port()));
    TcpStream::connect_timeout(&other, Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("connecting to {other} during the partition: {e}"));
    partition.heal();
    connects().unwrap_or_else(|e| panic!("connecting to {target} after healing: {e}"));
}

/// A partition is removed when the test holding it panics.
#[test]
fn a_panicking_test_heals_its_partition() {
    if !require_root("a_panicking_test_heals_its_partition") {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let result = thread::spawn(move || {
        let partition = LoopbackPartition::drop_to(Ipv4Addr::new(127, 0, 0, 5));
        tx.send(partition.table().to_owned()).unwrap();
        panic!("deliberate panic with a partition in place");
    })
    .join();
    assert!(result.is_err());
    let table = rx.recv().unwrap();
    let listed = Command::new("nft")
        .args(["list", "table", "inet", &table])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!listed.success(), "table inet {table} left behind");
}

/// Members on loopback aliases: partitioning the leader's address makes the other two
/// elect a new leader and keep serving; after healing, the old leader catches up.
#[test]
fn partitioned_leader_is_replaced() {
    if !require_root("partitioned_leader_is_replaced")
        || !etcd_available("partitioned_leader_is_replaced")
    {
        return;
    }
    let hosts = [2, 3, 4].map(|x| Ipv4Addr::new(127, 0, 0, x));
    let cluster = EtcdCluster::start_on(&hosts);
    cluster.put(0, "before", "1");
    let old = cluster.leader();
    let partition = LoopbackPartition::drop_to(hosts[old]);
    let new = cluster.wait_leader(Some(old));
    assert_ne!(new, old);
    let other = (0..3).find(|&i| i != old && i != new).unwrap();
    cluster.put(new, "during", "2");
    assert_eq!(cluster.get(other, "during").as_deref(), Some("2"));
    partition.heal();
    // A linearizable read through the old leader succeeds only once it has rejoined
    // (as a follower) and caught up; etcdctl's own timeout bounds each try.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cluster.etcdctl(old, &["get", "during", "--print-value-only"]);
        if out.status.success() && out.stdout == b"2\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m{old} did not catch up after healing: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}
