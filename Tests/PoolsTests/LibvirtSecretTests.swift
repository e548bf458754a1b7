#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Pools
import TestSupport
import Testing

/// libvirt's secret store (LibvirtSecretStore) in a scratch directory laid out as libvirtd lays
/// out /etc/libvirt/secrets, and libvirt iSCSI pools whose CHAP secret comes from it.
@Suite("libvirt secrets", .serialized)
struct LibvirtSecretTests {
    static let uuidA = "2ec115d7-3a88-3ceb-bc12-0ac909a6fd87"
    static let uuidB = "9b1d3c7e-5f0a-4c2b-8e61-7d4a2f9c0b13"
    static let uuidC = "c0ffee00-1111-4222-8333-944455556666"

    /// Writes secret `uuid` as libvirtd does: UUID.xml, and UUID.base64 unless `value` is nil.
    static func defineSecret(_ scratch: Scratch, _ uuid: String, usage: String, name: String, value: String?,
                             ephemeral: Bool = false, base64: String? = nil) throws {
        let element = usage == "iscsi" ? "target" : "name"
        try scratch.sh("mkdir -p secrets")
        try """
            <secret ephemeral='\(ephemeral ? "yes" : "no")' private='yes'>
              <uuid>\(uuid)</uuid>
              <usage type='\(usage)'>
                <\(element)>\(name)</\(element)>
              </usage>
            </secret>
            """.write(toFile: scratch.path("secrets/\(uuid).xml"), atomically: true, encoding: .utf8)
        if let text = base64 ?? value.map({ Data($0.utf8).base64EncodedString() }) {
            try text.write(toFile: scratch.path("secrets/\(uuid).base64"), atomically: true, encoding: .utf8)
        }
    }

    static func store(_ scratch: Scratch) -> LibvirtSecretStore { LibvirtSecretStore(directory: scratch.path("secrets")) }

    func message(_ body: () throws -> Any) -> String {
        do { _ = try body(); return "no error" } catch { return "\(error)" }
    }

    @Test func referenceInPoolDefinition() {
        #expect(LibvirtSecretStore.reference(inPool: "<source><auth type='chap' username='u'><secret usage='libvirtiscsi'/></auth></source>") == .usage("libvirtiscsi"))
        #expect(LibvirtSecretStore.reference(inPool: "<auth username=\"u\" type=\"ceph\">\n  <secret uuid=\"\(Self.uuidA)\"/>\n</auth>") == .uuid(Self.uuidA))
        #expect(LibvirtSecretStore.reference(inPool: "<auth type='chap' username='u'></auth>") == nil)
        // A <secret> outside <auth> is not the pool's.
        #expect(LibvirtSecretStore.reference(inPool: "<source><secret usage='x'/></source>") == nil)
    }

    @Test func lookupByUUIDAndByUsage() throws {
        let scratch = try Scratch()
        try Self.defineSecret(scratch, Self.uuidA, usage: "iscsi", name: "libvirtiscsi", value: "s3cretpassw0rd")
        try Self.defineSecret(scratch, Self.uuidB, usage: "ceph", name: "client.libvirt secret", value: "cephkey")
        // A ceph secret whose name is the iSCSI usage: not a match for iscsi.
        try Self.defineSecret(scratch, Self.uuidC, usage: "ceph", name: "libvirtiscsi", value: "other")
        let store = Self.store(scratch)
        #expect(try store.value(.uuid(Self.uuidA), usage: .iscsi, pool: "p") == Data("s3cretpassw0rd".utf8))
        #expect(try store.value(.usage("libvirtiscsi"), usage: .iscsi, pool: "p") == Data("s3cretpassw0rd".utf8))
        #expect(try store.value(.usage("client.libvirt secret"), usage: .ceph, pool: "p") == Data("cephkey".utf8))
        #expect(try store.value(.usage("libvirtiscsi"), usage: .ceph, pool: "p") == Data("other".utf8))
        let wrongType = message { try store.value(.uuid(Self.uuidB), usage: .iscsi, pool: "p") }
        #expect(wrongType.contains("usage type 'ceph', not 'iscsi'"), "\(wrongType)")
    }

    @Test func errorsNameWhatWasLookedForAndWhereNeverTheValue() throws {
        let scratch = try Scratch()
        let dir = scratch.path("secrets")
        try Self.defineSecret(scratch, Self.uuidA, usage: "iscsi", name: "twice", value: "s3cretpassw0rd")
        try Self.defineSecret(scratch, Self.uuidB, usage: "iscsi", name: "twice", value: "s3cretpassw0rd")
        try Self.defineSecret(scratch, Self.uuidC, usage: "iscsi", name: "eph", value: nil, ephemeral: true)
        try Self.defineSecret(scratch, "bad", usage: "iscsi", name: "bad", value: nil, base64: "not*base64!!")
        try Self.defineSecret(scratch, "novalue", usage: "iscsi", name: "novalue", value: nil)
        let store = Self.store(scratch)
        let none = message { try store.value(.usage("nosuch"), usage: .iscsi, pool: "san") }
        #expect(none == "libvirt pool san needs a secret of usage type 'iscsi' with <target>nosuch</target>, and \(dir) has none; give it with -o chap_secret_file=PATH", "\(none)")
        let several = message { try store.value(.usage("twice"), usage: .iscsi, pool: "san") }
        #expect(several.contains("<target>twice</target>, and \(dir) has 2: \(Self.uuidA), \(Self.uuidB)"), "\(several)")
        let noUUID = message { try store.value(.uuid("0000"), usage: .iscsi, pool: "san") }
        #expect(noUUID == "libvirt pool san: \(dir) has no secret 0000 (no 0000.xml)", "\(noUUID)")
        let cephNone = message { try store.value(.usage("x"), usage: .ceph, pool: "vms") }
        #expect(cephNone.contains("usage type 'ceph' with <name>x</name>") && cephNone.hasSuffix("-o keyring=PATH"), "\(cephNone)")
        let ephemeral = message { try store.value(.usage("eph"), usage: .iscsi, pool: "san") }
        #expect(ephemeral.contains("secret \(Self.uuidC) is ephemeral: its value is only in libvirtd's memory"), "\(ephemeral)")
        let noValue = message { try store.value(.usage("novalue"), usage: .iscsi, pool: "san") }
        #expect(noValue.contains("no \(dir)/novalue.base64") && noValue.contains("chap_secret_file"), "\(noValue)")
        let bad = message { try store.value(.usage("bad"), usage: .iscsi, pool: "san") }
        #expect(bad == "libvirt pool san: \(dir)/bad.base64 is not a base64 secret value", "\(bad)")
        #expect(!bad.contains("not*base64"))
        for text in [none, several, noUUID, ephemeral, noValue, bad] {
            #expect(!text.contains("s3cret") && !text.contains("\n"), "\(text)")
        }
        let traversal = message { try store.value(.uuid("../../etc/passwd"), usage: .iscsi, pool: "san") }
        #expect(traversal.contains("is not a UUID"), "\(traversal)")
        let missingStore = message { try LibvirtSecretStore(directory: scratch.path("nosuch")).value(.usage("x"), usage: .iscsi, pool: "san") }
        #expect(missingStore.contains("cannot read libvirt's secret store (\(scratch.path("nosuch")): No such file or directory)"), "\(missingStore)")
    }

    /// Root reads any mode, so the store a user cannot read is made by the access it goes through.
    @Test func unreadableStoreSuggestsChapSecretFile() throws {
        let denied = LibvirtSecretStore.Access(list: { _ throws(LibvirtSecretStore.Errno) in throw .init(rawValue: EACCES) },
                                               read: { _ throws(LibvirtSecretStore.Errno) in throw .init(rawValue: EACCES) })
        let store = LibvirtSecretStore(directory: "/etc/libvirt/secrets", access: denied)
        for reference in [LibvirtSecretStore.Reference.usage("x"), .uuid(Self.uuidA)] {
            let text = message { try store.value(reference, usage: .iscsi, pool: "san") }
            #expect(text.hasPrefix("libvirt pool san: cannot read libvirt's secret store (/etc/libvirt/secrets"), "\(text)")
            #expect(text.contains("Permission denied; only root can); give the secret with -o chap_secret_file=PATH"), "\(text)")
        }
    }

    /// A libvirt iscsi pool with CHAP, against a tgtd that wants it: the secret comes from the
    /// store by usage and by uuid, -o chap_secret_file wins over it, and a wrong one is refused.
    @Test func iscsiPoolLogsInWithTheStoresSecret() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 1M one.raw")
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        try target.requireCHAP(user: "alice", password: "s3cretpassw0rd")
        try Self.defineSecret(scratch, Self.uuidA, usage: "iscsi", name: "libvirtiscsi", value: "s3cretpassw0rd")
        try Self.defineSecret(scratch, Self.uuidB, usage: "iscsi", name: "wrongone", value: "wrongpassw0rd1")
        func definePool(_ name: String, secret: String) throws {
            try """
                <pool type='iscsi-direct'><name>\(name)</name><source>
                  <host name='127.0.0.1' port='\(target.port)'/>
                  <device path='\(TestTarget.iqn)'/>
                  <auth type='chap' username='alice'><secret \(secret)/></auth>
                </source></pool>
                """.write(toFile: scratch.path("\(name).xml"), atomically: true, encoding: .utf8)
        }
        try definePool("byusage", secret: "usage='libvirtiscsi'")
        try definePool("byuuid", secret: "uuid='\(Self.uuidA)'")
        try definePool("wrong", secret: "usage='wrongone'")
        func open(_ name: String, secret: String? = nil) throws -> any Pool {
            try PoolSource.open(name, type: nil, libvirtDirectory: scratch.dir, secretsDirectory: scratch.path("secrets"),
                                iscsi: ISCSIPool.Options(chapSecret: secret))
        }
        for name in ["byusage", "byuuid"] {
            let pool = try open(name)
            #expect(try pool.volumeNames() == ["unit:0:0:1"], "\(name)")
            _ = pool.release()
        }
        let refused = message { try open("wrong") }
        #expect(refused.contains("Authentication failure") && !refused.contains("wrongpassw0rd1"), "\(refused)")
        // -o chap_secret_file (the options' secret) wins over the store, both ways.
        let pool = try open("wrong", secret: "s3cretpassw0rd")
        #expect(try pool.volumeNames() == ["unit:0:0:1"])
        _ = pool.release()
        let given = message { try open("byusage", secret: "wrongpassw0rd1") }
        #expect(given.contains("Authentication failure"), "\(given)")
        // With no store at all, the error says where it looked and what to give instead.
        let noStore = message {
            try PoolSource.open("byusage", type: nil, libvirtDirectory: scratch.dir, secretsDirectory: scratch.path("nosuch"))
        }
        #expect(noStore.contains(scratch.path("nosuch")) && noStore.contains("-o chap_secret_file=PATH"), "\(noStore)")
    }

    /// An rbd pool's ceph secret becomes librados' `key`; one that cannot be had is said only if
    /// connecting fails (a cluster may need no key). A monitor nobody serves makes it fail fast.
    @Test func rbdPoolKeyFromTheStore() throws {
        let scratch = try Scratch()
        let key = Data((0..<16).map { UInt8($0 * 7 + 1) }).base64EncodedString()
        try Self.defineSecret(scratch, Self.uuidA, usage: "ceph", name: "client.libvirt secret", value: nil, base64: key)
        try """
            <pool type='rbd'><name>vms</name><source><name>rbdpool</name>
            <host name='127.0.0.1' port='\(try TestTarget.freePort())'/>
            <auth username='libvirt' type='ceph'><secret usage='client.libvirt secret'/></auth>
            </source></pool>
            """.write(toFile: scratch.path("vms.xml"), atomically: true, encoding: .utf8)
        func failure(secrets: String, keyring: String? = nil) -> String {
            var options = RBDPool.Options(confFile: "/dev/null", keyring: keyring)
            options.timeout = 1
            return message { try PoolSource.open("vms", type: nil, libvirtDirectory: scratch.dir, secretsDirectory: secrets, rbd: options) }
        }
        let withKey = failure(secrets: scratch.path("secrets"))
        #expect(withKey.hasPrefix("rbd: cannot reach Ceph cluster at 127.0.0.1:") && !withKey.contains("secret"), "\(withKey)")
        #expect(!withKey.contains(key))
        let noStore = failure(secrets: scratch.path("nosuch"))
        #expect(noStore.contains("(and the pool's libvirt secret was not used: libvirt pool vms: cannot read libvirt's secret store (\(scratch.path("nosuch"))"), "\(noStore)")
        // -o keyring wins: the store is not read at all.
        #expect(!failure(secrets: scratch.path("nosuch"), keyring: "/dev/null").contains("secret"))
    }

    /// The store's ceph key reaches librados: a Ceph monitor of the test's own that wants cephx
    /// (no OSD: connecting is what the key is for) lets the pool connect with the key libvirt's
    /// store holds, and refuses the key of another secret. The pool itself does not exist, so
    /// the open fails after connecting, at rados_ioctx_create, with a line that says so.
    @Test func rbdPoolConnectsWithTheStoresCephxKey() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/ceph-mon") else {
            print("SKIPPED: rbdPoolConnectsWithTheStoresCephxKey: no ceph-mon"); return
        }
        let scratch = try Scratch()
        let port = try TestTarget.freePort()
        let d = scratch.dir
        try (CephCluster.global(port: port, dir: d, auth: "cephx") + """
            keyring = /dev/null

            """).write(toFile: scratch.path("ceph.conf"), atomically: true, encoding: .utf8)
        try scratch.sh("""
            mkdir -p run mon && ceph-authtool --create-keyring mon.keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null && \
            ceph-authtool --create-keyring client.keyring --gen-key -n client.libvirt --cap mon 'allow *' >/dev/null && \
            ceph-authtool mon.keyring --import-keyring client.keyring >/dev/null && \
            ceph-mon -c ceph.conf --id a --mkfs --keyring mon.keyring 2>&1
            """)
        // Started detached (descriptors 3 and up closed, as CephCluster does), stopped by its pid file.
        try scratch.sh("\(CephCluster.detached) ceph-mon -c ceph.conf --id a")
        defer {
            if let text = try? String(contentsOfFile: scratch.path("run/mon.a.pid"), encoding: .utf8), let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                kill(pid, SIGKILL)
                for _ in 0..<100 where kill(pid, 0) == 0 && !((try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8))?.contains(") Z") ?? true) { usleep(50_000) }
            }
        }
        let key = try #require(try String(contentsOfFile: scratch.path("client.keyring"), encoding: .utf8)
            .split(separator: "\n").first { $0.contains("key = ") }.map { String($0.split(separator: "=", maxSplits: 1)[1]).trimmingCharacters(in: .whitespaces) })
        try Self.defineSecret(scratch, Self.uuidA, usage: "ceph", name: "client.libvirt secret", value: nil, base64: key)
        try Self.defineSecret(scratch, Self.uuidB, usage: "ceph", name: "other", value: nil, base64: "AQCusw5r7a53JRAALzMPQ444DP32LmVyPomzRQ==")
        for (name, secret) in [("right", "usage='client.libvirt secret'"), ("wrong", "uuid='\(Self.uuidB)'")] {
            try """
                <pool type='rbd'><name>\(name)</name><source><name>rbdpool</name>
                <host name='127.0.0.1' port='\(port)'/>
                <auth username='libvirt' type='ceph'><secret \(secret)/></auth>
                </source></pool>
                """.write(toFile: scratch.path("\(name).xml"), atomically: true, encoding: .utf8)
        }
        func failure(_ name: String) -> String {
            var options = RBDPool.Options(confFile: "/dev/null")
            // A refused key is retried until the bound (rados_connect: timed out).
            options.timeout = 2
            return message { try PoolSource.open(name, type: nil, libvirtDirectory: scratch.dir, secretsDirectory: scratch.path("secrets"), rbd: options) }
        }
        let right = failure("right")
        #expect(right.contains("rados_ioctx_create rbdpool"), "\(right)")
        let wrong = failure("wrong")
        #expect(wrong.contains("rados_connect") && !wrong.contains("rados_ioctx_create"), "\(wrong)")
        for text in [right, wrong] { #expect(!text.contains(key) && !text.contains("AQCusw5r"), "\(text)") }
    }
}
