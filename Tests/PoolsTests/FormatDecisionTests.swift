import Foundation
import TestSupport
import Block
import Pools
import Testing

/// A probed format without a reader is a decision like any other: recorded on the file, kept
/// when the content changes, and the volume refused with the format's reason, never served raw.
@Suite("format decisions of formats poolfs cannot read")
struct FormatDecisionTests {
    @Test func unsupportedFormatDecisionIsRecordedAndKept() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f parallels disk.hdd 3M")
        let decisions = FormatDecisions(domainDirectories: [])
        let file = try HostFile(path: scratch.path("disk.hdd"))
        #expect(try decisions.decide(file) == Image.FormatDecision(format: .parallels, declared: false))
        let recorded = FormatDecisions.recorded(fd: file.fd)
        #expect(recorded?.format == .parallels && recorded?.declared == false, "trusted.poolfs.format: \(String(describing: recorded))")

        var options = Image.Options()
        options.decideFormat = { try decisions.decide($0) }
        do {
            _ = try Image.open(path: scratch.path("disk.hdd"), cache: BlockCache(capacityBytes: 1 << 20), options: options)
            Issue.record("a parallels image opened")
        } catch let error as Qcow2Error {
            #expect(error.recognisedFormat == "parallels", "\(error)")
        }

        // The header wiped: the decision stands (the file is not probed again).
        try scratch.sh("dd if=/dev/zero of=disk.hdd bs=512 count=1 conv=notrunc status=none")
        #expect(try Image.probe(HostFile(path: scratch.path("disk.hdd"))) == .raw)
        #expect(try decisions.decide(HostFile(path: scratch.path("disk.hdd"))).format == .parallels)
    }
}
