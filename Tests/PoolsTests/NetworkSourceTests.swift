#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Block
@testable import Pools
import TestSupport
import Testing

/// Network pool sources as written on the command line and in libvirt definitions, the mount
/// table, and the resolution of names inside a share (no server needed).
struct NetworkSourceTests {
    @Test func glusterURLs() {
        #expect(GlusterAddress(url: "gluster://h/v") == GlusterAddress(host: "h", volume: "v"))
        #expect(GlusterAddress(url: "gluster+tcp://h:24008/v/a/b/") == GlusterAddress(host: "h", port: 24008, volume: "v", directory: "a/b"))
        #expect(GlusterAddress(url: "gluster://[::1]:1234/v")?.host == "::1")
        #expect(GlusterAddress(url: "gluster://[::1]:1234/v")?.url == "gluster://[::1]:1234/v")
        for bad in ["gluster://h", "gluster://h/", "gluster://:1/v", "gluster://h:0/v", "gluster://h:x/v", "gluster://h/v/../w", "nfs://h/v"] {
            #expect(GlusterAddress(url: bad) == nil, "\(bad)")
        }
    }

    @Test func nfsURLs() throws {
        #expect(try NFSAddress(url: "nfs://h/export") == NFSAddress(host: "h", path: "/export"))
        #expect(try NFSAddress(url: "nfs://h:2050/export/dir/?version=4") == NFSAddress(host: "h", port: 2050, path: "/export/dir", version: 4))
        #expect(try NFSAddress(url: "nfs://h/e?nfsport=2049&version=3") == NFSAddress(host: "h", port: 2049, path: "/e", version: 3))
        #expect(try NFSAddress(url: "gluster://h/v") == nil)
        for bad in ["nfs://h", "nfs://h/", "nfs://h/e?version=2", "nfs://h/e?uid=0", "nfs://h/../e", "nfs://:1/e"] {
            #expect(throws: PoolError.self, "\(bad)") { _ = try NFSAddress(url: bad) }
        }
    }

    @Test func mountTable() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p 'a b' c")
        let table = """
            36 25 0:32 / \(scratch.path("a\\040b")) rw,relatime - nfs4 srv:/export rw
            37 25 0:33 / \(scratch.path("c")) rw - fuse.glusterfs 127.0.0.1:v0 rw
            """
        try table.write(toFile: scratch.path("mountinfo"), atomically: true, encoding: .utf8)
        let spaced = MountTable.source(mountedAt: scratch.path("a b"), table: scratch.path("mountinfo"))
        #expect(spaced?.source == "srv:/export" && spaced?.fstype == "nfs4")
        #expect(MountTable.sameSource("srv:/export", "srv:/export/", fstype: "nfs4"))
        #expect(!MountTable.sameSource("srv:/export", "srv:/other", fstype: "nfs4"))
        #expect(MountTable.sameSource("127.0.0.1:v0", "127.0.0.1:/v0", fstype: "fuse.glusterfs"))
        #expect(MountTable.source(mountedAt: scratch.dir, table: scratch.path("mountinfo")) == nil)
        // A libvirt netfs pool whose target has another share mounted is refused, naming it.
        let xml = "<pool type='netfs'><source><host name='srv'/><dir path='/mine'/><format type='nfs'/></source></pool>"
        #expect(throws: PoolError.libvirt("libvirt pool p: \(scratch.path("a b")) has srv:/export (nfs4) mounted, not the pool's source srv:/mine")) {
            try PoolSource.openLibvirtMountable(xml, type: "netfs", target: scratch.path("a b"), file: "p.xml", name: "p",
                                                trust: PoolTrust(), options: NetworkPoolOptions(), mountTable: scratch.path("mountinfo"))
        }
        let cifs = "<pool type='netfs'><source><host name='srv'/><dir path='/s'/><format type='cifs'/></source></pool>"
        #expect(throws: PoolError.self) {
            try PoolSource.openLibvirtMountable(cifs, type: "netfs", target: scratch.path("c"), file: "p.xml", name: "p",
                                                trust: PoolTrust(), options: NetworkPoolOptions(), mountTable: "/nonexistent")
        }
    }

    /// Names inside a share resolve beneath the pool's directory, lexically, and nowhere else.
    @Test func namesResolveInsideTheShare() {
        final class Recorder: RemoteDirectory, @unchecked Sendable {
            var opened: [String] = []
            let location = "gluster://h/v/pool"
            func open(relativePath: String) throws(Qcow2Error) -> HostFile {
                opened.append(relativePath)
                throw .io(errno: ENOENT, operation: "open", path: relativePath)
            }
        }
        let share = Recorder()
        let image = "gluster://h/v/pool/d/top.qcow2"
        for (name, expected) in [("base.qcow2", "d/base.qcow2"), ("../b.qcow2", "b.qcow2"), ("./x/../y", "d/y")] {
            _ = try? ChainResolver.openRemote(name, what: "backing file", namedBy: image, in: share)
            #expect(share.opened.last == expected, "\(name)")
        }
        for name in ["../../out.qcow2", "/etc/passwd", "file:/etc/passwd", "json:{}", ".."] {
            #expect(throws: Qcow2Error.self, "\(name)") {
                _ = try ChainResolver.openRemote(name, what: "backing file", namedBy: image, in: share)
            }
        }
        #expect(share.opened.count == 3, "\(share.opened)")
    }
}
