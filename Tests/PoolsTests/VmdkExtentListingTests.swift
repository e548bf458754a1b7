import Foundation
import Pools
import Block
import TestSupport
import Testing

/// A dir pool lists a vmdk descriptor as one volume, and not the extent files it names beside it.
@Suite("dir pool vmdk extents")
struct VmdkExtentListingTests {
    @Test func extentFilesAreNotVolumes() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && cd pool
            qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse split.vmdk 3G
            qemu-img create -q -f vmdk -o subformat=monolithicFlat flat.vmdk 1M
            qemu-img create -q -f vmdk whole.vmdk 1M
            qemu-img create -q -f raw other-flat.vmdk 1M
            printf 'version=1\\nRW 2048 FLAT "other-flat.vmdk" 0\\n' > fake-desc
            """)
        // fake-desc is decided raw before it is changed into a descriptor: a decision is kept.
        try scratch.sh("printf 'plain' > pool/late.vmdk")
        let pool = try DirectoryPool(path: scratch.path("pool"))
        _ = try pool.formats.decide(HostFile(path: scratch.path("pool/late.vmdk")))
        try scratch.sh("printf 'version=1\\nCID=1\\nparentCID=ffffffff\\ncreateType=\"monolithicFlat\"\\nRW 2048 FLAT \"whole.vmdk\" 0\\n' > pool/late.vmdk")
        let names = try pool.volumeNames()
        #expect(names.contains("split.vmdk") && names.contains("flat.vmdk") && names.contains("whole.vmdk"))
        #expect(!names.contains("split-s001.vmdk") && !names.contains("split-s002.vmdk") && !names.contains("flat-flat.vmdk"))
        // A descriptor without createType is still a descriptor by FormatMagic's rule: its extent is hidden.
        #expect(!names.contains("other-flat.vmdk"))
        #expect(names.contains("late.vmdk") && names.contains("whole.vmdk"))
    }
}
