#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TestSupport
import Testing

/// The network servers the network-pool tests start: each comes up on loopback, QEMU's own
/// client sees a file made on it, and it goes when stopped.
@Suite("Network servers", .serialized)
struct NetworkServerTests {
    @Test(.enabled(if: GlusterServer.available)) func glusterServesAFileToQemu() throws {
        let server = try GlusterServer()
        defer { server.stop() }
        try server.scratch.sh("qemu-img create -q -f qcow2 mnt/x.qcow2 10M")
        let info = try server.scratch.sh("timeout 60 qemu-img info --output=json \(server.url("x.qcow2")) 2>/dev/null")
        #expect(info.contains("\"format\": \"qcow2\"") && info.contains("10485760"), "\(info)")
        let brick = server.brickPID
        #expect(brick != nil)
        server.stop()
        #expect(brick.map { kill($0, 0) != 0 } ?? false, "the brick outlived stop")
    }

    @Test(.enabled(if: NFSServer.available)) func nfsServesAFileToLibnfs() throws {
        let server = try NFSServer()
        defer { server.stop() }
        try server.scratch.sh("qemu-img create -q -f qcow2 export/x.qcow2 10M")
        let listing = try server.scratch.sh("timeout 10 nfs-ls '\(server.toolURL())'")
        #expect(listing.contains("x.qcow2"), "\(listing)")
        try server.scratch.sh("timeout 10 nfs-cp '\(server.toolURL("x.qcow2"))' copy.qcow2 && cmp copy.qcow2 export/x.qcow2")
        let pid = server.pid
        server.stop()
        #expect(pid.map { kill($0, 0) != 0 } ?? false, "ganesha outlived stop")
    }
}
