import Foundation
@testable import Pools
import Synchronization
import Testing

/// lvm2 played as a small model of a volume group (this host has no device-mapper): `lvs`, `vgs`
/// and `pvs` report its LVs as lvm2 2.03 does (attributes, origins, thin ids), and `lvcreate -s`,
/// `lvremove`, `lvrename`, `lvconvert --merge` and `lvchange` change it as lvm2 does, as seen in
/// the device-mapper VM: a thin LV whose origin is removed has no origin any more, a merged
/// classic snapshot is gone, a merge into an open origin is deferred (the snapshot hidden as
/// `[NAME]`, type `S`). Every command is recorded; `failing` makes the first matching one fail.
final class LVMModel: CommandRunner {
    struct LV {
        var name: String
        var size: UInt64
        var attr: String
        var origin = ""
        var pool = ""
        var segtype = "linear"
        var thinID: UInt64? = nil
        var extents: UInt64 = 0
    }
    static let extent: UInt64 = 4 << 20
    let lvs: Mutex<[LV]>
    let calls = Mutex<[[String]]>([])
    typealias Failure = (match: @Sendable ([String]) -> Bool, error: CommandError)
    let failing: Mutex<Failure?>
    /// `lvconvert --merge` finds the origin opened meanwhile.
    let defersMerge: Bool

    init(_ lvs: [LV], failing: Failure? = nil, defersMerge: Bool = false) {
        self.lvs = Mutex(lvs)
        self.failing = Mutex(failing)
        self.defersMerge = defersMerge
    }

    /// A VG `testvg`: `lin` (12 MiB) and `big` (100 MiB) linear, a thin pool and the 64 MiB thin LV `thin`.
    static func standard(_ extra: [LV] = [], open: Set<String> = [], inactive: Set<String> = []) -> [LV] {
        var all = [LV(name: "lin", size: 12 << 20, attr: "-wi-a-----", extents: 3),
                   LV(name: "big", size: 100 << 20, attr: "-wi-a-----", extents: 25),
                   LV(name: "pool", size: 32 << 20, attr: "twi-aotz--", segtype: "thin-pool"),
                   LV(name: "thin", size: 64 << 20, attr: "Vwi-a-tz--", pool: "pool", segtype: "thin", thinID: 1)] + extra
        for i in all.indices {
            var a = Array(all[i].attr)
            if open.contains(all[i].name) { a[5] = "o" }
            if inactive.contains(all[i].name) { a[4] = "-" }
            all[i].attr = String(a)
        }
        return all
    }

    /// The commands that change the VG, in order.
    var changes: [[String]] { calls.withLock { $0.filter { !["lvs", "vgs", "pvs"].contains($0[0]) } } }

    func run(_ arguments: [String]) throws -> String {
        calls.withLock { $0.append(arguments) }
        if let failure = failing.withLock({ f -> CommandError? in
            guard let current = f, current.match(arguments) else { return nil }
            f = nil
            return current.error
        }) { throw failure }
        switch arguments[0] {
        case "lvs": return lvsReport()
        case "vgs": return #"{"report": [{"vg": [{"vg_name":"testvg", "vg_extent_size":"4194304"}]}]}"#
        case "pvs": return #"{"report": [{"pv": [{"pv_name":"/dev/loop0", "vg_name":"testvg", "pe_start":"1048576"}]}]}"#
        default: break
        }
        try lvs.withLock { lvs in try change(&lvs, arguments) }
        return ""
    }

    private func lvName(_ full: String) -> String { String(full.split(separator: "/").last ?? "") }
    private func value(after flag: String, in arguments: [String]) -> String? {
        arguments.firstIndex(of: flag).flatMap { $0 + 1 < arguments.count ? arguments[$0 + 1] : nil }
    }
    private func set(_ lv: inout LV, _ index: Int, _ c: Character) {
        var a = Array(lv.attr)
        a[index] = c
        lv.attr = String(a)
    }

    private func change(_ lvs: inout [LV], _ arguments: [String]) throws {
        func fail(_ why: String) -> CommandError { CommandError(commandLine: arguments.joined(separator: " "), status: 5, stderr: why) }
        func index(_ name: String) throws -> Int {
            guard let i = lvs.firstIndex(where: { $0.name == name }) else { throw fail("Failed to find logical volume \"testvg/\(name)\"") }
            return i
        }
        switch arguments[0] {
        case "lvcreate":
            guard arguments.contains("-s"), let name = value(after: "-n", in: arguments) else { throw fail("model: unexpected lvcreate") }
            guard !lvs.contains(where: { $0.name == name }) else { throw fail("Logical Volume \"\(name)\" already exists in volume group \"testvg\"") }
            let origin = lvs[try index(lvName(arguments.last!))]
            if origin.segtype == "thin" {
                let active = arguments.contains("-kn") && value(after: "-a", in: arguments) != "n"
                let id = (lvs.compactMap(\.thinID).max() ?? 0) + 1
                lvs.append(LV(name: name, size: origin.size, attr: active ? "Vwi-a-tz--" : "Vwi---tz-" + (arguments.contains("-kn") ? "-" : "k"),
                              origin: origin.name, pool: origin.pool, segtype: "thin", thinID: id))
            } else {
                guard let extents = value(after: "-l", in: arguments).flatMap(UInt64.init) else { throw fail("model: a classic snapshot needs -l") }
                let active = Array(origin.attr)[4]
                lvs.append(LV(name: name, size: extents * Self.extent, attr: "swi-\(active)-s---", origin: origin.name, extents: extents))
                set(&lvs[try index(origin.name)], 0, "o")
            }
        case "lvremove":
            for full in arguments.dropFirst().filter({ $0.hasPrefix("testvg/") }) {
                let removed = lvs.remove(at: try index(lvName(full)))
                for i in lvs.indices where lvs[i].origin == removed.name && lvs[i].segtype == "thin" { lvs[i].origin = "" }
                if removed.attr.first == "s", !lvs.contains(where: { $0.origin == removed.origin && $0.attr.first == "s" }),
                   let o = lvs.firstIndex(where: { $0.name == removed.origin }) {
                    set(&lvs[o], 0, "-")
                }
            }
        case "lvrename":
            let (from, to) = (arguments[arguments.count - 2], arguments[arguments.count - 1])
            guard !lvs.contains(where: { $0.name == to }) else { throw fail("Logical Volume \"\(to)\" already exists") }
            lvs[try index(from)].name = to
            for i in lvs.indices where lvs[i].origin == from { lvs[i].origin = to }
        case "lvconvert":
            let s = try index(lvName(arguments.last!))
            if defersMerge {
                lvs[s].name = "[\(lvs[s].name)]"
                set(&lvs[s], 0, "S")
                set(&lvs[try index(lvs[s].origin)], 0, "O")
            } else {
                let origin = lvs[s].origin
                lvs.remove(at: s)
                if !lvs.contains(where: { $0.origin == origin && $0.attr.first == "s" }) { set(&lvs[try index(origin)], 0, "-") }
            }
        case "lvchange":
            let name = lvName(arguments.last!)
            let state: Character = arguments.contains("-ay") ? "a" : "-"
            for i in lvs.indices where lvs[i].name == name || lvs[i].origin == name && lvs[i].attr.first == "s" { set(&lvs[i], 4, state) }
        default:
            throw fail("not recorded")
        }
    }

    private func lvsReport() -> String {
        let rows = lvs.withLock { lvs in
            lvs.map { lv in
                let ranges = lv.extents > 0 ? "/dev/loop0:0-\(lv.extents - 1)" : ""
                return #"{"lv_name":"\#(lv.name)", "vg_name":"testvg", "lv_size":"\#(lv.size)", "lv_attr":"\#(lv.attr)", "origin":"\#(lv.origin)", "pool_lv":"\#(lv.pool)", "segtype":"\#(lv.segtype)", "seg_start":"0", "seg_size":"\#(lv.extents > 0 ? lv.extents * Self.extent : lv.size)", "stripes":"1", "stripe_size":"0", "seg_pe_ranges":"\#(ranges)", "lv_path":"/dev/testvg/\#(lv.name)", "thin_id":"\#(lv.thinID.map(String.init) ?? "")"}"#
            }
        }
        return #"{"report": [{"lv": ["# + rows.joined(separator: ",\n") + "]}]}"
    }
}

@Suite("logical pool snapshots")
struct LogicalSnapshotTests {
    /// A pool whose report stays as it was at open (each operation asks lvs itself).
    static func pool(_ model: LVMModel, mode: LogicalPool.Mode = .devices, cowSize: LogicalPool.CowSize = .default) throws -> LogicalPool {
        try LogicalPool(volumeGroup: "testvg", runner: model, mode: mode, reportLifetime: 3600, cowSize: cowSize)
    }

    /// The snapshot files a fresh look at the VG shows for `volume`.
    static func files(_ model: LVMModel, of volume: String) throws -> [String] {
        try pool(model).snapshots(of: volume).map(\.name).sorted()
    }

    @Test func createTakesThinAndClassicSnapshotsNamedVolumePlusName() throws {
        let model = LVMModel(LVMModel.standard())
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "big", dryRun: false)
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "lin", dryRun: false)
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "thin", dryRun: false)
        try Self.pool(model, cowSize: .bytes(6 << 20)).snapshot(.create(replace: false), "monday", of: "big", dryRun: false)
        try Self.pool(model, cowSize: .percent(100)).snapshot(.create(replace: false), "full", of: "lin", dryRun: false)
        #expect(model.changes == [
            ["lvcreate", "-q", "-y", "-s", "-l", "5", "-n", "big+class", "testvg/big"],    // 20 % of 100 MiB: 5 extents
            ["lvcreate", "-q", "-y", "-s", "-l", "1", "-n", "lin+class", "testvg/lin"],    // 2.4 MiB: rounded up to one
            ["lvcreate", "-q", "-y", "-s", "-n", "thin+class", "testvg/thin"],             // thin: in its pool, no size
            ["lvcreate", "-q", "-y", "-s", "-l", "2", "-n", "big+monday", "testvg/big"],   // cow_size=6M: 2 extents
            ["lvcreate", "-q", "-y", "-s", "-l", "3", "-n", "lin+full", "testvg/lin"],     // cow_size=100%
        ])
        #expect(try Self.files(model, of: "big") == ["class", "monday"])
        #expect(try Self.files(model, of: "thin") == ["class"])
        #expect(try Self.pool(model).volumeNames() == ["big", "lin", "thin"], "snapshot LVs are not volumes")
    }

    @Test func replaceRemovesOnlyASnapshotOfThisVolume() throws {
        let model = LVMModel(LVMModel.standard([
            .init(name: "thin+class", size: 64 << 20, attr: "Vwi---tz-k", origin: "thin", pool: "pool", segtype: "thin", thinID: 2),
            .init(name: "lin+class", size: 64 << 20, attr: "Vwi-a-tz--", pool: "pool", segtype: "thin", thinID: 3),  // a volume
        ]))
        let pool = try Self.pool(model)
        #expect(throws: SnapshotError.exists("class")) { try pool.snapshot(.create(replace: false), "class", of: "thin", dryRun: false) }
        #expect(throws: LogicalSnapshotError.nameTaken("testvg/lin+class", "is not a snapshot of lin")) {
            try pool.snapshot(.create(replace: true), "class", of: "lin", dryRun: false)
        }
        #expect(model.changes.isEmpty)
        try pool.snapshot(.create(replace: true), "class", of: "thin", dryRun: true)
        #expect(model.changes.isEmpty, "a dry run changes nothing")
        try pool.snapshot(.create(replace: true), "class", of: "thin", dryRun: false)
        #expect(model.changes == [["lvremove", "-q", "-y", "testvg/thin+class"], ["lvcreate", "-q", "-y", "-s", "-n", "thin+class", "testvg/thin"]])
    }

    @Test func revertOfAClassicSnapshotMergesAndTakesItAgain() throws {
        let model = LVMModel(LVMModel.standard())
        try Self.pool(model, cowSize: .bytes(8 << 20)).snapshot(.create(replace: false), "class", of: "big", dryRun: false)
        try Self.pool(model).snapshot(.revert(force: false), "class", of: "big", dryRun: false)
        #expect(model.changes.dropFirst() == [
            ["lvconvert", "-q", "-y", "--merge", "--interval", "1", "testvg/big+class"],
            ["lvcreate", "-q", "-y", "-s", "-l", "2", "-n", "big+class", "testvg/big"],   // the same COW size, not cow_size's default
        ])
        #expect(try Self.files(model, of: "big") == ["class"], "taken again: the next revert can run")
    }

    @Test func anInactiveOriginIsActivatedForTheMergeAndDeactivatedAfter() throws {
        let model = LVMModel(LVMModel.standard([.init(name: "lin+class", size: 4 << 20, attr: "swi---s---", origin: "lin", extents: 1)], inactive: ["lin"]))
        try Self.pool(model).snapshot(.revert(force: false), "class", of: "lin", dryRun: false)
        #expect(model.changes == [
            ["lvchange", "-q", "-ay", "-y", "--ignoremonitoring", "testvg/lin"],
            ["lvconvert", "-q", "-y", "--merge", "--interval", "1", "testvg/lin+class"],
            ["lvcreate", "-q", "-y", "-s", "-l", "1", "-n", "lin+class", "testvg/lin"],
            ["lvchange", "-q", "-an", "testvg/lin"],
        ])
    }

    @Test func aMergeLvm2DefersFailsTheVolume() throws {
        let model = LVMModel(LVMModel.standard([.init(name: "lin+class", size: 4 << 20, attr: "swi-a-s---", origin: "lin", extents: 1)]), defersMerge: true)
        #expect(throws: LogicalSnapshotError.mergeDeferred("testvg/lin+class", "testvg/lin")) {
            try Self.pool(model).snapshot(.revert(force: false), "class", of: "lin", dryRun: false)
        }
        #expect(model.changes.map { $0[0] } == ["lvconvert"], "not taken again over a pending merge")
    }

    @Test func revertOfAThinSnapshotReplacesTheLVAndKeepsTheSnapshotOfIt() throws {
        let model = LVMModel(LVMModel.standard())
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "thin", dryRun: false)
        try Self.pool(model).snapshot(.revert(force: false), "class", of: "thin", dryRun: false)
        #expect(model.changes.dropFirst() == [
            ["lvrename", "-q", "testvg", "thin", "thin+class+old"],
            ["lvcreate", "-q", "-y", "-s", "-kn", "-a", "y", "-n", "thin", "testvg/thin+class"],
            ["lvcreate", "-q", "-y", "-s", "-n", "thin+class+new", "testvg/thin"],
            ["lvremove", "-q", "-y", "testvg/thin+class+old", "testvg/thin+class"],
            ["lvrename", "-q", "testvg", "thin+class+new", "thin+class"],
        ])
        let lvs = model.lvs.withLock { $0 }
        #expect(lvs.first { $0.name == "thin" }?.origin == "", "the LV is a volume again: its origin was removed")
        #expect(lvs.first { $0.name == "thin+class" }?.origin == "thin")
        #expect(lvs.first { $0.name == "thin" }?.thinID == 3, "new data: another thin device")
        #expect(try Self.files(model, of: "thin") == ["class"])
        try Self.pool(model).snapshot(.revert(force: false), "class", of: "thin", dryRun: false)
        #expect(model.changes.count == 11, "and again, next class")
    }

    @Test func aThinRevertThatFailsToMakeTheNewLVPutsTheOldNameBack() throws {
        let refused = CommandError(commandLine: "lvcreate", status: 5, stderr: "Cannot create new thin volume, free space in thin pool testvg/pool reached threshold.")
        let model = LVMModel(LVMModel.standard([.init(name: "thin+class", size: 64 << 20, attr: "Vwi---tz-k", origin: "thin", pool: "pool", segtype: "thin", thinID: 2)]),
                             failing: (match: { $0.contains("-kn") }, error: refused))
        #expect(throws: refused) { try Self.pool(model).snapshot(.revert(force: false), "class", of: "thin", dryRun: false) }
        #expect(model.changes.map { $0[0] } == ["lvrename", "lvcreate", "lvrename"])
        #expect(model.changes.last == ["lvrename", "-q", "testvg", "thin+class+old", "thin"])
        #expect(model.lvs.withLock { $0.map(\.name) }.sorted() == ["big", "lin", "pool", "thin", "thin+class"])
    }

    @Test func aThinRevertWouldDetachOtherSnapshotsOnlyWithForce() throws {
        let model = LVMModel(LVMModel.standard([
            .init(name: "thin+class", size: 64 << 20, attr: "Vwi---tz-k", origin: "thin", pool: "pool", segtype: "thin", thinID: 2),
            .init(name: "thin+monday", size: 64 << 20, attr: "Vwi---tz-k", origin: "thin", pool: "pool", segtype: "thin", thinID: 3),
        ]))
        #expect(throws: LogicalSnapshotError.otherSnapshots("testvg/thin", ["thin+monday"])) {
            try Self.pool(model).snapshot(.revert(force: false), "class", of: "thin", dryRun: false)
        }
        #expect(model.changes.isEmpty)
        try Self.pool(model).snapshot(.revert(force: true), "class", of: "thin", dryRun: false)
        #expect(try Self.pool(model).volumeNames() == ["big", "lin", "thin", "thin+monday"], "lvm2 keeps no origin for it")
    }

    @Test func deleteRemovesTheSnapshotLV() throws {
        let model = LVMModel(LVMModel.standard([.init(name: "lin+class", size: 4 << 20, attr: "swi-a-s---", origin: "lin", extents: 1)]))
        try Self.pool(model).snapshot(.delete, "class", of: "lin", dryRun: false)
        #expect(model.changes == [["lvremove", "-q", "-y", "testvg/lin+class"]])
        #expect(try Self.files(model, of: "lin").isEmpty)
    }

    @Test func openVolumesAndMissingSnapshotsAreSkippedUntouched() throws {
        let snapshot = LVMModel.LV(name: "lin+class", size: 4 << 20, attr: "swi-a-s---", origin: "lin", extents: 1)
        let model = LVMModel(LVMModel.standard([snapshot], open: ["lin", "thin"]))
        let pool = try Self.pool(model)
        for operation in [SnapshotOperation.create(replace: true), .revert(force: true), .delete] {
            #expect(throws: SnapshotSkip.inUse("testvg/lin is open (no process of this host shows it open: a kernel user, or another host)")) {
                try pool.snapshot(operation, "class", of: "lin", dryRun: false)
            }
        }
        #expect(throws: SnapshotSkip.self) { try pool.snapshot(.create(replace: false), "class", of: "thin", dryRun: false) }
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.revert(force: false), "class", of: "big", dryRun: false) }
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.delete, "class", of: "big", dryRun: false) }
        #expect(throws: SnapshotError.noSuchVolume("lin+class")) { try pool.snapshot(.delete, "class", of: "lin+class", dryRun: false) }
        // The snapshot open (a mount reading it) holds the volume too.
        let reading = LVMModel(LVMModel.standard([snapshot], open: ["lin+class"]))
        #expect(throws: SnapshotSkip.inUse("testvg/lin+class is open (no process of this host shows it open: a kernel user, or another host)")) {
            try Self.pool(reading).snapshot(.revert(force: false), "class", of: "lin", dryRun: false)
        }
        #expect(model.changes.isEmpty && reading.changes.isEmpty)
    }

    /// lvm2 cannot make, merge or remove a snapshot without activating LVs.
    @Test func withoutDeviceMapperNothingIsTried() throws {
        let model = LVMModel(LVMModel.standard())
        let pool = try Self.pool(model, mode: .extents)
        #expect(pool.snapshotRefusal?.contains("device-mapper") == true)
        let before = model.calls.withLock { $0.count }
        #expect(throws: LogicalSnapshotError.self) { try pool.snapshot(.create(replace: false), "class", of: "lin", dryRun: false) }
        #expect(model.calls.withLock { $0.count } == before, "not even lvs")
        #expect(LogicalPool.snapshotRefusal(noactivate: true)?.contains("-o noactivate") == true)
        #expect(try Self.pool(model).snapshotRefusal == nil)
    }

    @Test(arguments: ["", "a+b", "-x", ".", "..", "a b", "a/b", "x_tmeta", "my_rimage_1", "é", "a%b", String(repeating: "n", count: 124)])
    func badNamesAreRefusedBeforeAnything(_ name: String) throws {
        let model = LVMModel(LVMModel.standard())
        let pool = try Self.pool(model)
        let before = model.calls.withLock { $0.count }
        #expect(throws: LogicalSnapshotError.self) { try pool.snapshot(.create(replace: false), name, of: "lin", dryRun: false) }
        #expect(model.calls.withLock { $0.count } <= before + 1, "at most lvs")
        #expect(model.changes.isEmpty)
    }

    /// `.snapshots/lin/class` is `lin+class`, unless an LV named `class` is a snapshot of lin too.
    @Test func snapshotFilesDropTheVolumePrefixWhenUnambiguous() throws {
        let model = LVMModel(LVMModel.standard([
            .init(name: "lin+class", size: 4 << 20, attr: "swi---s---", origin: "lin", extents: 1),
            .init(name: "class", size: 4 << 20, attr: "swi---s---", origin: "lin", extents: 1),
            .init(name: "lin+monday", size: 4 << 20, attr: "swi---s---", origin: "lin", extents: 1),
            .init(name: "big+x+y", size: 4 << 20, attr: "swi---s---", origin: "big", extents: 1),
        ]))
        #expect(try Self.files(model, of: "lin") == ["class", "lin+class", "monday"])
        #expect(try Self.files(model, of: "big") == ["big+x+y"])
        try Self.pool(model).snapshot(.delete, "class", of: "lin", dryRun: false)
        #expect(model.changes == [["lvremove", "-q", "-y", "testvg/class"]], "NAME is what .snapshots/VOL/ shows")
    }

    @Test func cowSizesAreWholeExtents() {
        let extent: UInt64 = 4 << 20
        #expect(LogicalPool.CowSize.percent(20).extents(origin: 100 << 20, extentSize: extent) == 5)
        #expect(LogicalPool.CowSize.percent(20).extents(origin: 101 << 20, extentSize: extent) == 6)
        #expect(LogicalPool.CowSize.percent(1).extents(origin: 4 << 20, extentSize: extent) == 1)
        #expect(LogicalPool.CowSize.bytes(1).extents(origin: 0, extentSize: extent) == 1)
        #expect(LogicalPool.CowSize.bytes(8 << 20).extents(origin: 0, extentSize: extent) == 2)
        #expect(LogicalPool.CowSize.percent(100).extents(origin: UInt64.max, extentSize: extent) == UInt64.max / extent + 1, "no overflow")
    }

    /// A mount notices a revert: the LV's thin id, or its snapshot's extents, are part of its generation.
    @Test func aRevertChangesTheGeneration() throws {
        let model = LVMModel(LVMModel.standard())
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "thin", dryRun: false)
        try Self.pool(model).snapshot(.create(replace: false), "class", of: "lin", dryRun: false)
        let before = try Self.pool(model)
        try Self.pool(model).snapshot(.revert(force: false), "class", of: "thin", dryRun: false)
        model.lvs.withLock { lvs in
            // A classic snapshot taken again elsewhere on the PV: same name, same attributes.
            if let i = lvs.firstIndex(where: { $0.name == "lin+class" }) { lvs[i].extents = 2 }
        }
        let after = try Self.pool(model)
        #expect(before.generation(of: "thin") != after.generation(of: "thin"))
        #expect(before.generation(of: "lin") != after.generation(of: "lin"))
        #expect(before.generation(of: "big") == after.generation(of: "big"))
    }
}
