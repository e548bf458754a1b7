import Foundation
import TestSupport
import Testing

/// A dir pool over a kernel-mounted NFS share. This host's kernel has no NFS client, so the
/// device-mapper VM (`scripts/dm-vm.sh --net`, Debian's kernel under TCG, this host's root read-only)
/// mounts the export of a ganesha of this test's own on the host (NFSv4.1, 10.0.2.2 from the VM)
/// and `dm-vm/check-nfs.sh` serves it with poolfs: every volume byte for byte, an image rewritten on
/// the server's side while mounted read anew, and what QEMU's image locks do over NFS.
///
/// Alone, as root: `POOLFS_BIN=$(swift build --show-bin-path)/poolfs swift test --filter NFSKernelMountVMTests`.
@Suite("A dir pool over a kernel NFS mount, in a QEMU VM", .serialized, .enabled(if: NFSServer.available))
struct NFSKernelMountVMTests {
    @Test func dirPoolOverKernelNFSMount() throws {
        let server = try NFSServer()
        defer { server.stop() }
        // The VM shares one host directory (at its own path): the server's scratch, with the export in it.
        let work = server.scratch
        let poolfs = URL(fileURLWithPath: Binary.path).standardizedFileURL.path
        try work.sh("mkdir -p expect vmtmp && cp '\(DeviceMapperVMTests.scripts)/check-nfs.sh' .")
        if ["/tmp/", "/run/", "/var/tmp/", "/dev/"].contains(where: poolfs.hasPrefix) {
            try work.sh("cp '\(poolfs)' poolfs-bin")
        }
        let binary = ["/tmp/", "/run/", "/var/tmp/", "/dev/"].contains(where: poolfs.hasPrefix) ? work.path("poolfs-bin") : poolfs
        try work.sh("""
            cd export && qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null \
            && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 4M && qemu-io -c 'write -P 0x22 512k 1M' top.qcow2 >/dev/null \
            && qemu-img create -q -f qcow2 disk.qcow2 5M && qemu-io -c 'write -P 0x55 0 2M' disk.qcow2 >/dev/null \
            && head -c 3000001 /dev/urandom > odd.raw && cd .. \
            && for f in base.qcow2 top.qcow2 disk.qcow2; do qemu-img convert -O raw export/$f expect/$f.raw; done \
            && cp export/odd.raw expect/odd.raw.raw
            """)
        try "sh '\(work.path("check-nfs.sh"))' '\(work.dir)' '\(server.exportDir)' \(server.port) '\(binary)'\n"
            .write(toFile: work.path("run.sh"), atomically: true, encoding: .utf8)
        let run = work.attempt("'\(DeviceMapperVMTests.dmVM)' --net --timeout 600 '\(work.dir)' run.sh 2>&1")
        let log = String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: work.path("vm.log")))) ?? Data(), as: UTF8.self)
        for line in log.split(separator: "\n") where line.hasPrefix("check-nfs: ") { print("NFSKernelMountVMTests: \(line)") }
        #expect(run.ok, "the VM failed: \(log.suffix(4000))\n\(run.output.suffix(2000))")
        for check in ["read", "fresh", "lock"] {
            #expect(log.contains("check-nfs: \(check) OK"), "\(check): \(log.suffix(3000))")
        }
    }
}
