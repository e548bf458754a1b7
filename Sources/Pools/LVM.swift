import Foundation

/// What `lvs`, `pvs` and `vgs --reportformat json` say about a volume group, parsed into a model.
/// Values are requested with `--units b --nosuffix`, so sizes are plain byte counts.
public struct VolumeGroupReport: Sendable, Equatable {
    public struct Segment: Sendable, Equatable {
        public enum Kind: Sendable, Equatable {
            case linear
            /// Data striped over `stripes` PV ranges in chunks of `stripeSize` bytes.
            case striped(stripeSize: UInt64)
            /// Anything else (thin, snapshot, mirror, raid, cache...): readable only through
            /// device-mapper.
            case other(String)
        }
        public var kind: Kind
        /// Where the segment starts in the LV, and its length, in bytes.
        public var start: UInt64
        public var size: UInt64
        /// The PV extent ranges it uses, in stripe order.
        public var ranges: [ExtentRange]
    }

    public struct ExtentRange: Sendable, Equatable {
        public var device: String
        public var firstExtent: UInt64
        public var lastExtent: UInt64
        public var extentCount: UInt64 { lastExtent - firstExtent + 1 }
    }

    public struct LogicalVolume: Sendable, Equatable {
        public var name: String
        public var size: UInt64
        /// `lv_attr`: character 0 is the volume type, 4 the state, 5 whether it is open.
        public var attributes: String
        public var origin: String?
        public var pool: String?
        public var path: String
        public var segments: [Segment]
        /// Thin LVs: the device id inside the pool's metadata (`thin_id`).
        public var thinID: UInt64? = nil
        /// Thin pools: lvm2's transaction id, and their data and metadata LVs (`[pool_tdata]`).
        public var transactionID: UInt64? = nil
        public var dataVolume: String? = nil
        public var metadataVolume: String? = nil
        /// Classic snapshots: the exception chunk size; thin pools: the data block size (bytes).
        public var chunkSize: UInt64 = 0

        /// The first `lv_attr` character.
        public var type: Character { attributes.first ?? "-" }
        /// `lv_attr` character 4: `-` inactive; `a` active, `I` an active snapshot found invalid,
        /// `s` suspended, `m` a failed merge, `d`/`i` a device without its table... all mapped.
        /// `X` where lvm2 cannot ask the kernel (no device-mapper).
        public var state: Character { attributes.count > 4 ? Array(attributes)[4] : "-" }
        /// The LV has a device-mapper device (whatever its state): activating it again is a no-op,
        /// and deactivating it would undo someone else's activation.
        public var isActive: Bool { state != "-" && state != "X" }
        /// `lv_attr` character 5: `o` while its device is open (a running VM, a mount, a reader).
        public var isOpen: Bool { attributes.count > 5 && Array(attributes)[5] == "o" }
        /// A classic snapshot (its COW is its own segments), merging (`S`) or not.
        public var isClassicSnapshot: Bool { "sS".contains(type) }
        /// A thin LV (`V`): its blocks are mapped by its pool.
        public var isThin: Bool { type == "V" }
        /// Thin pools, their data and metadata, mirror and raid images, logs, spares and every
        /// `[bracketed]` LV are LVM's internals, not volumes.
        public var isInternal: Bool { name.hasPrefix("[") || "tTeiIrRlmpvCwdD".contains(type) }
        /// A classic (`s`, `S` while merging) or thin (`V` with an origin) snapshot.
        public var isSnapshot: Bool { "sS".contains(type) || (type == "V" && origin != nil) }
    }

    public var name: String
    public var extentSize: UInt64
    /// Where extents start on each PV (`pe_start`), by device path.
    public var extentStart: [String: UInt64]
    public var volumes: [LogicalVolume]

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case json(String)
        case field(String, value: String)
        public var description: String {
            switch self {
            case .json(let what): return "unexpected LVM report: \(what)"
            case .field(let name, let value): return "unexpected LVM report field \(name)=\(value)"
            }
        }
    }

    /// Fields asked of `lvs`; one row per segment.
    public static let lvsFields = "lv_name,vg_name,lv_size,lv_attr,origin,pool_lv,segtype,seg_start,seg_size,stripes,stripe_size,seg_pe_ranges,lv_path,thin_id,transaction_id,data_lv,metadata_lv,chunk_size"

    /// How every report is asked for: JSON, sizes in bytes without a unit.
    static let reportOptions = ["--reportformat", "json", "--units", "b", "--nosuffix"]

    /// Queries the volume group through `runner`.
    public static func query(_ vg: String, runner: any CommandRunner) throws -> VolumeGroupReport {
        let common = reportOptions
        let lvs = try runner.run(["lvs", "-a", "-o", lvsFields] + common + [vg])
        let vgs = try runner.run(["vgs", "-o", "vg_name,vg_extent_size"] + common + [vg])
        let pvs = try runner.run(["pvs", "-o", "pv_name,vg_name,pe_start"] + common)
        return try parse(vg: vg, lvs: lvs, vgs: vgs, pvs: pvs)
    }

    /// The LVs asked again (`lvs` only), with the extent size and PV starts of `self`, which
    /// creating, renaming and removing LVs do not change.
    public func requeryingVolumes(runner: any CommandRunner) throws -> VolumeGroupReport {
        let lvs = try runner.run(["lvs", "-a", "-o", Self.lvsFields] + Self.reportOptions + [name])
        var report = self
        report.volumes = try Self.parseVolumes(lvs, extentSize: extentSize)
        return report
    }

    public static func parse(vg: String, lvs: String, vgs: String, pvs: String) throws -> VolumeGroupReport {
        let groups = try rows(vgs, "vg")
        guard let group = groups.first(where: { $0["vg_name"] == vg }) else { throw ParseError.json("vgs has no \(vg)") }
        let extentSize = try number(group, "vg_extent_size")
        var starts: [String: UInt64] = [:]
        for pv in try rows(pvs, "pv") where pv["vg_name"] == vg {
            starts[pv["pv_name"] ?? ""] = try number(pv, "pe_start")
        }
        return VolumeGroupReport(name: vg, extentSize: extentSize, extentStart: starts, volumes: try parseVolumes(lvs, extentSize: extentSize))
    }

    static func parseVolumes(_ lvs: String, extentSize: UInt64) throws -> [LogicalVolume] {
        var volumes: [LogicalVolume] = []
        for row in try rows(lvs, "lv") {
            let name = row["lv_name"] ?? ""
            let segment = try parseSegment(row, extentSize: extentSize)
            if let i = volumes.firstIndex(where: { $0.name == name }) {
                volumes[i].segments.append(segment)
            } else {
                volumes.append(LogicalVolume(
                    name: name, size: try number(row, "lv_size"), attributes: row["lv_attr"] ?? "",
                    origin: row["origin"].flatMap { $0.isEmpty ? nil : $0 },
                    pool: row["pool_lv"].flatMap { $0.isEmpty ? nil : $0 },
                    path: row["lv_path"] ?? "", segments: [segment],
                    thinID: try optionalNumber(row, "thin_id"), transactionID: try optionalNumber(row, "transaction_id"),
                    dataVolume: row["data_lv"].flatMap { $0.isEmpty ? nil : $0 },
                    metadataVolume: row["metadata_lv"].flatMap { $0.isEmpty ? nil : $0 },
                    chunkSize: try optionalNumber(row, "chunk_size") ?? 0))
            }
        }
        return volumes
    }

    static func parseSegment(_ row: [String: String], extentSize: UInt64) throws -> Segment {
        let type = row["segtype"] ?? ""
        let kind: Segment.Kind
        switch type {
        case "linear": kind = .linear
        case "striped": kind = .striped(stripeSize: try number(row, "stripe_size"))
        default: kind = .other(type)
        }
        var ranges: [ExtentRange] = []
        // "/dev/loop0:3-3 /dev/loop1:0-0": device, colon, first and last extent.
        for part in (row["seg_pe_ranges"] ?? "").split(separator: " ") {
            guard let colon = part.lastIndex(of: ":") else { throw ParseError.field("seg_pe_ranges", value: String(part)) }
            let bounds = part[part.index(after: colon)...].split(separator: "-")
            // `extentCount` (last - first + 1) must fit a UInt64.
            guard bounds.count == 2, let first = UInt64(bounds[0]), let last = UInt64(bounds[1]), first <= last,
                  last < UInt64.max else {
                throw ParseError.field("seg_pe_ranges", value: String(part))
            }
            ranges.append(ExtentRange(device: String(part[..<colon]), firstExtent: first, lastExtent: last))
        }
        return Segment(kind: kind, start: try number(row, "seg_start"), size: try number(row, "seg_size"), ranges: ranges)
    }

    /// The objects under report[0][key].
    static func rows(_ json: String, _ key: String) throws -> [[String: String]] {
        guard let object = try? JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any],
              let report = (object["report"] as? [[String: Any]])?.first,
              let rows = report[key] as? [[String: String]] else {
            throw ParseError.json("no report.\(key) array")
        }
        return rows
    }

    /// A number that only some LVs have: absent or empty is nil.
    static func optionalNumber(_ row: [String: String], _ field: String) throws -> UInt64? {
        guard let text = row[field], !text.isEmpty else { return nil }
        return try number(row, field)
    }

    static func number(_ row: [String: String], _ field: String) throws -> UInt64 {
        guard let text = row[field], let value = UInt64(text) else { throw ParseError.field(field, value: row[field] ?? "(missing)") }
        return value
    }
}
