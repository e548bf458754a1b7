import Foundation
@testable import Pools
import Block
import Synchronization
import TestSupport
import Testing

/// Replays recorded command output; fails like the real command for anything it was not given.
final class FakeRunner: CommandRunner {
    let outputs: [String: Result<String, CommandError>]
    let calls = Mutex<[[String]]>([])

    init(_ outputs: [String: Result<String, CommandError>]) { self.outputs = outputs }

    func run(_ arguments: [String]) throws -> String {
        calls.withLock { $0.append(arguments) }
        // Recorded by program and subcommand ("zfs get"), or by program alone ("lvs").
        guard let result = outputs[arguments.prefix(2).joined(separator: " ")] ?? outputs[arguments[0]] else {
            throw CommandError(commandLine: arguments.joined(separator: " "), status: 127, stderr: "not recorded")
        }
        return try result.get()
    }
}

enum Recorded {
    /// Real output of lvm2 2.03 on loop devices (see Fixtures/README.md for the commands).
    static func fixture(_ name: String) throws -> String {
        let url = try #require(Bundle.module.url(forResource: name, withExtension: "json", subdirectory: "Fixtures"))
        return try String(contentsOf: url, encoding: .utf8)
    }
}

@Suite("LVM reports")
struct LVMReportTests {
    @Test func recordedReportParses() throws {
        let report = try VolumeGroupReport.parse(vg: "testvg", lvs: Recorded.fixture("lvs"),
                                                 vgs: Recorded.fixture("vgs"), pvs: Recorded.fixture("pvs"))
        #expect(report.extentSize == 4 << 20)
        #expect(report.extentStart == ["/dev/loop0": 1 << 20, "/dev/loop1": 1 << 20])
        #expect(report.volumes.map(\.name) == ["lin", "span", "striped"])
        let span = report.volumes[1]
        #expect(span.size == 80 << 20)
        #expect(span.segments.map(\.start) == [0, 56 << 20])
        #expect(span.segments.map(\.ranges) == [
            [.init(device: "/dev/loop1", firstExtent: 1, lastExtent: 14)],
            [.init(device: "/dev/loop0", firstExtent: 4, lastExtent: 9)],
        ])
        let striped = report.volumes[2]
        #expect(striped.segments[0].kind == .striped(stripeSize: 65536))
        #expect(striped.segments[0].ranges.map(\.device) == ["/dev/loop0", "/dev/loop1"])
        #expect(report.volumes.allSatisfy { !$0.isInternal && !$0.isSnapshot && $0.path.hasPrefix("/dev/testvg/") })
    }

    @Test func queryAsksEachToolOnceAndCarriesFailures() throws {
        let runner = FakeRunner(["lvs": .success(try Recorded.fixture("lvs")), "vgs": .success(try Recorded.fixture("vgs")),
                                 "pvs": .success(try Recorded.fixture("pvs"))])
        #expect(try VolumeGroupReport.query("testvg", runner: runner).volumes.count == 3)
        #expect(runner.calls.withLock { $0.map { $0[0] } } == ["lvs", "vgs", "pvs"])
        #expect(runner.calls.withLock { $0[0] }.contains("--reportformat"))

        // What lvm2 printed for a volume group that does not exist (exit status 5).
        let missing = CommandError(commandLine: "lvs -a -o \(VolumeGroupReport.lvsFields) --reportformat json --units b --nosuffix nosuchvg",
                                   status: 5, stderr: "  Volume group \"nosuchvg\" not found\n  Cannot process volume group nosuchvg\n")
        let failing = FakeRunner(["lvs": .failure(missing)])
        #expect(throws: missing) { try VolumeGroupReport.query("nosuchvg", runner: failing) }
        #expect(missing.description.hasSuffix("exited with status 5: Volume group \"nosuchvg\" not found\n  Cannot process volume group nosuchvg"))
    }

    @Test(arguments: [
        #"{"report":[{"lv":[{"lv_name":"a","lv_size":"x"}]}]}"#,
        #"{"report":[]}"#,
        "not json",
        #"{"report":[{"lv":[{"lv_name":"a","lv_size":"1","segtype":"linear","seg_start":"0","seg_size":"1","seg_pe_ranges":"/dev/x:5-2"}]}]}"#,
    ])
    func malformedReportsAreErrors(_ lvs: String) throws {
        #expect(throws: VolumeGroupReport.ParseError.self) {
            try VolumeGroupReport.parse(vg: "testvg", lvs: lvs, vgs: Recorded.fixture("vgs"), pvs: Recorded.fixture("pvs"))
        }
    }

    @Test func segmentsThatNeedDeviceMapperAreRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 64M pv")
        let group = VolumeGroupReport(name: "vg", extentSize: 4 << 20, extentStart: ["/dev/pv": 1 << 20], volumes: [])
        let thin = VolumeGroupReport.LogicalVolume(
            name: "thin1", size: 4 << 20, attributes: "Vwi-a-tz--", origin: nil, pool: "pool", path: "/dev/vg/thin1",
            segments: [.init(kind: .other("thin"), start: 0, size: 4 << 20, ranges: [])])
        #expect(throws: ExtentMappedDevice.MapError.unsupportedSegment(volume: "thin1", type: "thin")) {
            try ExtentMappedDevice(volume: thin, in: group) { _ in try HostFile(path: scratch.path("pv")) }
        }
        let elsewhere = VolumeGroupReport.LogicalVolume(
            name: "lin", size: 4 << 20, attributes: "-wi-a-----", origin: nil, pool: nil, path: "/dev/vg/lin",
            segments: [.init(kind: .linear, start: 0, size: 4 << 20, ranges: [.init(device: "/dev/gone", firstExtent: 0, lastExtent: 0)])])
        #expect(throws: ExtentMappedDevice.MapError.missingPhysicalVolume("/dev/gone")) {
            try ExtentMappedDevice(volume: elsewhere, in: group) { _ in try HostFile(path: scratch.path("pv")) }
        }
        let pastEnd = VolumeGroupReport.LogicalVolume(
            name: "big", size: 8 << 20, attributes: "-wi-a-----", origin: nil, pool: nil, path: "/dev/vg/big",
            segments: [.init(kind: .linear, start: 0, size: 8 << 20, ranges: [.init(device: "/dev/pv", firstExtent: 15, lastExtent: 16)])])
        #expect(throws: ExtentMappedDevice.MapError.inconsistent(volume: "big", why: "extents run past the end of /dev/pv")) {
            try ExtentMappedDevice(volume: pastEnd, in: group) { _ in try HostFile(path: scratch.path("pv")) }
        }
    }
}

/// A real volume group on loop devices, made with lvm2 and `--driverloaded n` (no device-mapper
/// needed). Every 512-byte sector of every LV is written, at the PV offset the LVM report gives,
/// with its own LV name and offset; reading each LV through ExtentMappedDevice must find them all.
@Suite("LVM on loop devices", .serialized)
struct RealLVMTests {
    @Test func linearSpanningAndStripedVolumesReadBack() throws {
        let scratch = try Scratch()
        let group = try LoopVolumeGroup("poolfstest\(getpid())", in: scratch)
        defer { group.remove() }
        let vg = group.name
        let loops = group.loops
        try group.createVolume("-L 12M -n lin")
        try group.createVolume("-L 8M -i 2 -I 64k -n striped")
        try group.createVolume("-L 80M -n span")
        let report = try VolumeGroupReport.query(vg, runner: SystemCommandRunner())
        #expect(report.volumes.map(\.name).sorted() == ["lin", "span", "striped"])
        #expect(report.volumes.first { $0.name == "span" }?.segments.count == 2, "span crosses both PVs")

        // The writer: PV offset of each LV byte from the report, the straightforward way.
        let pvFiles = Dictionary(uniqueKeysWithValues: zip(loops, LoopVolumeGroup.backingFiles))
        var handles: [String: FileHandle] = [:]
        for (loop, file) in pvFiles { handles[loop] = try FileHandle(forUpdating: URL(fileURLWithPath: scratch.path(file))) }
        func sector(_ lv: String, _ offset: UInt64) -> Data {
            var d = Data("\(lv)@\(offset);".utf8)
            d.append(Data(repeating: UInt8(offset / 512 % 251), count: 512 - d.count))
            return d
        }
        for lv in report.volumes {
            for segment in lv.segments {
                let n = UInt64(segment.ranges.count)
                var o: UInt64 = 0
                while o < segment.size {
                    let (range, onStripe): (VolumeGroupReport.ExtentRange, UInt64)
                    if case .striped(let s) = segment.kind {
                        range = segment.ranges[Int((o / s) % n)]
                        onStripe = (o / s / n) * s + o % s
                    } else {
                        range = segment.ranges[0]
                        onStripe = o
                    }
                    let at = report.extentStart[range.device]! + range.firstExtent * report.extentSize + onStripe
                    try handles[range.device]!.seek(toOffset: at)
                    handles[range.device]!.write(sector(lv.name, segment.start + o))
                    o += 512
                }
            }
        }
        for handle in handles.values { try handle.close() }

        for lv in report.volumes {
            let device = try ExtentMappedDevice(volume: lv, in: report) { try HostFile(path: $0) }
            #expect(device.size == lv.size)
            var bad = 0
            var offset: UInt64 = 0
            while offset < device.size {
                let chunk = try device.read(at: offset, count: 1 << 20)
                for i in stride(from: 0, to: chunk.count, by: 512) where Data(chunk[i..<i + 512]) != sector(lv.name, offset + UInt64(i)) {
                    bad += 1
                }
                offset += UInt64(chunk.count)
            }
            #expect(bad == 0, "\(lv.name): \(bad) sectors read back wrong")
            // Odd-sized reads across stripe and segment boundaries.
            let probe = lv.size / 2 - 700
            let slice = try device.read(at: probe, count: 300_000)
            let whole = try device.read(at: probe - probe % 512, count: 300_000 + 1024)
            #expect(Data(slice) == Data(whole[Int(probe % 512)..<Int(probe % 512) + 300_000]))
        }
    }
}

@Suite("logical pools")
struct LogicalPoolTests {
    /// The recorded report plus one classic snapshot of `lin`. lvm2 cannot make snapshots without
    /// device-mapper, so this row is constructed from lvs's documented fields (lv_attr 's', origin).
    static func runner() throws -> FakeRunner {
        let snapshotRow = #"{"lv_name":"lin-snap", "vg_name":"testvg", "lv_size":"12582912", "lv_attr":"swi-a-s---", "origin":"lin", "pool_lv":"", "segtype":"linear", "seg_start":"0", "seg_size":"4194304", "stripes":"1", "stripe_size":"0", "seg_pe_ranges":"/dev/loop1:15-15", "lv_path":"/dev/testvg/lin-snap"},"#
        let lvs = try Recorded.fixture("lvs").replacingOccurrences(of: #""lv": ["#, with: #""lv": ["# + snapshotRow)
        return FakeRunner(["lvs": .success(lvs), "vgs": .success(try Recorded.fixture("vgs")), "pvs": .success(try Recorded.fixture("pvs"))])
    }

    @Test func snapshotsAppearUnderTheirOriginAndExplainThemselves() throws {
        let pool = try LogicalPool(volumeGroup: "testvg", runner: Self.runner(), mode: .extents)
        #expect(try pool.volumeNames() == ["lin", "span", "striped"])
        #expect(pool.volume("lin")?.path == "/dev/loop0", "extents mode stats the first PV")
        #expect(pool.volume("lin-snap")?.path == nil, "a snapshot is not a volume")
        let snapshots = pool.snapshots(of: "lin")
        #expect(snapshots.map(\.name) == ["lin-snap"])
        #expect(try snapshots[0].open().size == 12 << 20, "a classic snapshot has its origin's size, not its COW's")
        #expect(pool.snapshots(of: "span").isEmpty)
    }

    /// lvm2 reports a thin snapshot of a thin snapshot with the first as its origin: both show
    /// under the volume they come from, and an invalidated or merging snapshot says so.
    @Test func snapshotChainsEndAtTheirVolume() throws {
        func row(_ name: String, _ attr: String, origin: String = "", pool: String = "", segtype: String = "thin", ranges: String = "") -> String {
            #"{"lv_name":"\#(name)", "vg_name":"testvg", "lv_size":"12582912", "lv_attr":"\#(attr)", "origin":"\#(origin)", "pool_lv":"\#(pool)", "segtype":"\#(segtype)", "seg_start":"0", "seg_size":"12582912", "stripes":"1", "stripe_size":"0", "seg_pe_ranges":"\#(ranges)", "lv_path":"/dev/testvg/\#(name)", "thin_id":"1"},"#
        }
        let rows = row("thin", "Vwi---tz--", pool: "pool") + row("ts1", "Vwi---tz-k", origin: "thin", pool: "pool")
            + row("ts2", "Vwi---tz-k", origin: "ts1", pool: "pool") + row("orphan", "Vwi---tz--", pool: "pool")
            + row("lin-bad", "swi-I-s---", origin: "lin", segtype: "linear", ranges: "/dev/loop1:15-15")
        let base = try LogicalPoolTests.runner()
        let lvs = try #require(try base.outputs["lvs"]?.get()).replacingOccurrences(of: #""lv": ["#, with: #""lv": ["# + rows)
        let pool = try LogicalPool(volumeGroup: "testvg", runner: FakeRunner(base.outputs.merging(["lvs": .success(lvs)]) { _, b in b }), mode: .extents)
        #expect(try pool.volumeNames() == ["lin", "orphan", "span", "striped", "thin"])
        #expect(pool.snapshots(of: "thin").map(\.name) == ["ts1", "ts2"])
        #expect(pool.snapshots(of: "lin").map(\.name) == ["lin-bad", "lin-snap"])
        #expect(throws: LogicalPoolError.invalidated("testvg/lin-bad")) {
            try pool.snapshots(of: "lin")[0].open().read(at: 0, count: 512)
        }
        #expect(pool.volume("thin")?.path == "/dev/loop0", "an LV without extents of its own stats a PV of the VG")
    }

    @Test func theReportIsAskedForAgainOnlyWhenOld() throws {
        let runner = try Self.runner()
        let pool = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .extents, reportLifetime: 3600)
        for _ in 0..<10 { _ = try pool.volumeNames() }
        #expect(runner.calls.withLock { $0.count } == 3, "one lvs, vgs and pvs at open, none after")
        let eager = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .extents, reportLifetime: 0)
        _ = try eager.volumeNames()
        // The refresh runs on its own thread; a loaded machine may finish it after the listing's wait.
        let deadline = Date().addingTimeInterval(10)
        while runner.calls.withLock({ $0.count }) < 9, Date() < deadline { usleep(10_000) }
        #expect(runner.calls.withLock { $0.count } == 9, "one refresh: lvs, vgs and pvs once more")
    }
}

@Suite("logical pool activation")
struct LogicalPoolActivationTests {
    /// Devices mode on a host with device-mapper, played by a fake runner and regular files under
    /// a scratch directory standing in for /dev/testvg/*.
    @Test func inactiveVolumesAreActivatedForTheMountAndDeactivatedAfter() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p dev/testvg && head -c 12582912 /dev/urandom > dev/testvg/lin")
        let runner = try ActivatingRunner()
        let pool = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .devices, deviceRoot: scratch.dir)
        let image = try pool.openImage("lin", volume: pool.volume("lin")!, cache: BlockCache(capacityBytes: 0))
        #expect(try Data(image.live.read(at: 0, count: 12 << 20)) == Data(contentsOf: URL(fileURLWithPath: scratch.path("dev/testvg/lin"))))
        let again = try pool.openImage("lin", volume: pool.volume("lin")!, cache: BlockCache(capacityBytes: 0))
        _ = try again.live.read(at: 0, count: 512)
        let activations = runner.calls.withLock { $0.filter { $0[0] == "lvchange" } }
        #expect(activations == [["lvchange", "-ay", "-K", "-y", "--ignoremonitoring", "--config",
                                 "activation { read_only_volume_list = [ \"testvg/lin\", \"testvg/lin-snap\" ] }", "testvg/lin"]],
                "activated once, read-only, without touching the LV's permission or starting dmeventd")
        #expect(pool.release().isEmpty)
        #expect(runner.calls.withLock { $0.last } == ["lvchange", "-an", "-y", "testvg/lin"])
        #expect(pool.release().isEmpty && runner.calls.withLock { $0.last } == ["lvchange", "-an", "-y", "testvg/lin"], "deactivated once")
    }

    /// LVs that were mapped before (active, or an active snapshot lvm2 found invalid: state `I`)
    /// are neither activated nor deactivated: the last one used to be, which took its origin and
    /// every snapshot of it down at unmount.
    @Test func volumesMappedBeforeAreLeftAsTheyWere() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p dev/testvg && head -c 12582912 /dev/urandom > dev/testvg/lin-snap && cp dev/testvg/lin-snap dev/testvg/lin-bad")
        let runner = try ActivatingRunner(active: ["lin"], extraRows: [
            #"{"lv_name":"lin-bad", "vg_name":"testvg", "lv_size":"4194304", "lv_attr":"swi-I-s---", "origin":"lin", "pool_lv":"", "segtype":"linear", "seg_start":"0", "seg_size":"4194304", "stripes":"1", "stripe_size":"0", "seg_pe_ranges":"/dev/loop1:14-14", "lv_path":"/dev/testvg/lin-bad"},"#])
        let pool = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .devices, deviceRoot: scratch.dir)
        for snapshot in pool.snapshots(of: "lin") { _ = try snapshot.open().read(at: 0, count: 512) }
        #expect(pool.snapshots(of: "lin").map(\.name).sorted() == ["lin-bad", "lin-snap"])
        #expect(pool.release().isEmpty)
        #expect(runner.calls.withLock { $0.filter { $0[0] == "lvchange" } }.isEmpty)
    }

    @Test func aFailedActivationSaysWhy() throws {
        let base = try LogicalPoolTests.runner()
        let refusal = CommandError(commandLine: "lvchange -ay", status: 5, stderr: "  /dev/mapper/control: open failed: No such device")
        let runner = FakeRunner(base.outputs.merging(["lvchange": .failure(refusal)]) { a, _ in a })
        let pool = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .devices)
        let image = try pool.openImage("lin", volume: PoolVolume(path: "/dev/testvg/lin", status: stat()), cache: BlockCache(capacityBytes: 0))
        #expect(image.virtualSize == 12 << 20, "the size comes from the report: opening activates nothing")
        #expect(runner.calls.withLock { $0.filter { $0[0] == "lvchange" } }.isEmpty)
        #expect(throws: LogicalPoolError.activation("testvg/lin", "\(refusal)")) { try image.live.read(at: 0, count: 512) }
        #expect(pool.release().isEmpty, "nothing to deactivate")
    }

    /// An activation that hangs holds up the reads that need it (until the runner's time limit),
    /// never listing, opening or the sizes of other volumes.
    @Test func aHangingActivationBlocksNoLookup() throws {
        let base = try LogicalPoolTests.runner()
        let gate = DispatchSemaphore(value: 0)
        let runner = GatedRunner(base: base, gate: gate, program: "lvchange")
        let pool = try LogicalPool(volumeGroup: "testvg", runner: runner, mode: .devices, reportLifetime: 0)
        let image = try pool.openImage("lin", volume: PoolVolume(path: "/dev/testvg/lin", status: stat()), cache: BlockCache(capacityBytes: 0))
        let reading = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            _ = try? image.live.read(at: 0, count: 512)
            reading.signal()
        }
        while runner.waiting.withLock({ $0 }) == 0 { usleep(1000) }
        let start = Date()
        #expect(try pool.volumeNames() == ["lin", "span", "striped"])
        #expect(try pool.openImage("span", volume: PoolVolume(path: "/dev/testvg/span", status: stat()), cache: BlockCache(capacityBytes: 0)).virtualSize == 80 << 20)
        #expect(try image.live.status(detection: .metadataOnly).allSatisfy(\.data), "st_blocks without activating")
        _ = pool.generation(of: "lin")
        _ = pool.snapshots(of: "lin").map { try? $0.open().size }
        #expect(Date().timeIntervalSince(start) < 1)
        gate.signal()
        #expect(reading.wait(timeout: .now() + 10) == .success)
    }
}

/// lvm2 played over the recorded report: `lvchange -ay VG/LV` maps the LV (its `lv_attr` shows
/// it active), `lvchange -an` unmaps it; every call is recorded.
final class ActivatingRunner: CommandRunner {
    let base: FakeRunner
    let active: Mutex<Set<String>>
    let calls = Mutex<[[String]]>([])
    let rows: String

    init(active: Set<String> = [], extraRows: [String] = []) throws {
        base = try LogicalPoolTests.runner()
        self.active = Mutex(active)
        rows = extraRows.joined()
    }

    func run(_ arguments: [String]) throws -> String {
        calls.withLock { $0.append(arguments) }
        let lv = String(arguments.last?.split(separator: "/").last ?? "")
        switch arguments[0] {
        case "lvchange":
            active.withLock { if arguments.contains("-ay") { $0.insert(lv) } else { $0.remove(lv) } }
            return ""
        case "lvs":
            var lvs = try base.run(arguments).replacingOccurrences(of: #""lv": ["#, with: #""lv": ["# + rows)
            for name in active.withLock({ $0 }) {
                lvs = lvs.replacingOccurrences(of: #""lv_name":"\#(name)", "vg_name":"testvg", "lv_size":"12582912", "lv_attr":"-wi-XX----""#,
                                               with: #""lv_name":"\#(name)", "vg_name":"testvg", "lv_size":"12582912", "lv_attr":"-wi-a-----""#)
            }
            return lvs
        default:
            return try base.run(arguments)
        }
    }
}

/// Lets `program` run only once `gate` is signalled; everything else replays `base`.
final class GatedRunner: CommandRunner {
    let base: FakeRunner
    let gate: DispatchSemaphore
    let program: String
    let waiting = Mutex(0)

    init(base: FakeRunner, gate: DispatchSemaphore, program: String) {
        self.base = base; self.gate = gate; self.program = program
    }

    func run(_ arguments: [String]) throws -> String {
        if arguments[0] == program {
            waiting.withLock { $0 += 1 }
            gate.wait()
            return ""
        }
        return try base.run(arguments)
    }
}

@Suite("command runner")
struct CommandRunnerTests {
    @Test func aCommandThatOutlivesItsTimeIsKilled() throws {
        let start = Date()
        do {
            _ = try SystemCommandRunner(timeout: 1).run(["sleep", "30"])
            Issue.record("sleep 30 finished within a 1-second limit")
        } catch let error as CommandError {
            #expect(error.description.contains("did not finish within 1 seconds and was killed"), "\(error)")
        }
        #expect(Date().timeIntervalSince(start) < 5)
    }

    /// A daemon the command leaves behind (as lvchange can leave dmeventd) keeps its output open:
    /// the runner still returns when the command exits.
    @Test func aChildLeftRunningDoesNotHoldTheOutput() throws {
        let start = Date()
        let out = try SystemCommandRunner(timeout: 20).run(["sh", "-c", "sleep 10 & echo done; echo oops >&2"])
        #expect(out == "done\n")
        #expect(Date().timeIntervalSince(start) < 5)
        #expect(throws: CommandError(commandLine: "sh -c 'echo no >&2; exit 3'", status: 3, stderr: "no\n")) {
            try SystemCommandRunner().run(["sh", "-c", "echo no >&2; exit 3"])
        }
    }
}

@Suite("zfs pools")
struct ZfsPoolTests {
    /// `zfs list -H -p -t volume,snapshot -r -o name,type,volsize,creation tank/vms` and
    /// `zfs get -H -p -r -t volume -o name,value,source snapdev tank/vms`, in the format zfs(8)
    /// documents for -H -p (tab-separated, exact numbers, "-" for none). This machine has no zfs
    /// module, so these lines are constructed, not recorded; names with spaces are included.
    static let list = [
        "tank/vms/web\tvolume\t8388608\t1763800000",
        "tank/vms/web@monday\tsnapshot\t8388608\t1763810000",
        "tank/vms/sub/db\tvolume\t4194304\t1763800100",
        "tank/vms/sub/db@nightly 1\tsnapshot\t4194304\t1763820000",
        "tank/vms@daily\tsnapshot\t-\t1763830000",
    ].joined(separator: "\n") + "\n"
    static let snapdev = "tank/vms/web\thidden\tdefault\ntank/vms/sub/db\thidden\tlocal\n"

    static func runner(list: String = list) -> FakeRunner {
        FakeRunner(["zfs list": .success(list), "zfs get": .success(snapdev), "zfs set": .success(""), "zfs inherit": .success("")])
    }

    @Test func zvolsAndSnapshotsBecomeVolumesAndSnapshotFiles() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p dev/zvol/tank/vms/sub && head -c 8388608 /dev/urandom > dev/zvol/tank/vms/web && head -c 8388608 /dev/urandom > 'dev/zvol/tank/vms/web@monday'")
        let pool = try ZfsPool(dataset: "tank/vms", runner: Self.runner(), deviceRoot: scratch.dir)
        #expect(try pool.volumeNames() == ["sub%2Fdb", "web"])
        #expect(pool.volume("web")?.path == scratch.dir + "/dev/zvol/tank/vms/web")
        #expect(pool.snapshots(of: "web").map(\.name) == ["monday"])
        #expect(pool.snapshots(of: "sub%2Fdb").map(\.name) == ["nightly 1"])
        let monday = try pool.snapshots(of: "web")[0].open()
        #expect(try Data(monday.read(at: 0, count: 8 << 20)) == Data(contentsOf: URL(fileURLWithPath: scratch.path("dev/zvol/tank/vms/web@monday"))))
        #expect(throws: ZfsPoolError.snapshotDeviceMissing("tank/vms/sub/db@nightly 1")) { try pool.snapshots(of: "sub%2Fdb")[0].open() }
        #expect(pool.generation(of: "web") == "8388608 [\"tank/vms/web@monday\"]", "size and snapshots")
    }

    @Test func snapdevIsMadeVisibleForTheMountAndRestoredAfter() throws {
        let runner = Self.runner()
        let pool = try ZfsPool(dataset: "tank/vms", runner: runner)
        try pool.prepare()
        #expect(pool.release().isEmpty)
        let changes = runner.calls.withLock { $0.filter { $0[1] == "set" || $0[1] == "inherit" } }
        #expect(changes == [
            ["zfs", "set", "snapdev=visible", "tank/vms/web"],
            ["zfs", "set", "snapdev=visible", "tank/vms/sub/db"],
            ["zfs", "set", "snapdev=hidden", "tank/vms/sub/db"],   // it was set locally: set it back
            ["zfs", "inherit", "snapdev", "tank/vms/web"],         // it was the default: inherit again
        ])
    }

    @Test func aMissingDatasetSaysWhatZfsSaid() throws {
        let missing = CommandError(commandLine: "zfs list -H -p -t volume,snapshot -r -o name,type,volsize,creation tank/nope",
                                   status: 1, stderr: "cannot open 'tank/nope': dataset does not exist\n")
        #expect(throws: missing) { try ZfsPool(dataset: "tank/nope", runner: FakeRunner(["zfs list": .failure(missing)])) }
        #expect(missing.description.hasSuffix("exited with status 1: cannot open 'tank/nope': dataset does not exist"))
    }

    @Test(arguments: ["tank/vms/web volume 8388608 1", "tank/vms/web\tvolume\t8388608", "\tvolume\t1\t1"])
    func linesThatAreNotTabSeparatedAreErrors(_ line: String) {
        #expect(throws: VolumeGroupReport.ParseError.self) { try ZfsPool.parse(line) }
    }
}
