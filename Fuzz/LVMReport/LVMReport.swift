// libFuzzer target: LVM reports. The input is the output of `lvs`, `vgs` and `pvs
// --reportformat json` (and optionally the VG's name, default "testvg"), separated by NUL bytes.
// It is parsed with `VolumeGroupReport.parse`; every LV is then mapped onto its PVs with
// `ExtentMappedDevice` (each PV a 128 MiB sparse file), read at its start and end, and its
// allocation status taken over its first MiB. A crash, a hang, or an error other than the
// parser's and the mapper's typed errors is a finding.
import FuzzSupport
import Pools
import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var physicalVolume: HostFile?

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if physicalVolume == nil {
        physicalVolume = try! HostFile(path: scratch.patternFile("pv.raw", size: 128 << 20, patterned: 256 << 10))
    }
    let input = FuzzInput(data, size)
    let parts = input.bytes.split(separator: 0, maxSplits: 3, omittingEmptySubsequences: false)
        .map { String(decoding: $0, as: UTF8.self) }
    guard parts.count >= 3 else { return -1 }
    let vg = parts.count > 3 ? parts[3] : "testvg"
    do {
        let report = try VolumeGroupReport.parse(vg: vg, lvs: parts[0], vgs: parts[1], pvs: parts[2])
        for volume in report.volumes.prefix(32) {
            _ = (volume.isActive, volume.isThin, volume.isInternal, volume.isSnapshot, volume.state, volume.type)
            do {
                let device = try ExtentMappedDevice(volume: volume, in: report) { _ in physicalVolume! }
                try exercise(device)
            } catch is ExtentMappedDevice.MapError {
            }
        }
    } catch is VolumeGroupReport.ParseError {
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "LVM report")
    }
    return 0
}

func exercise(_ device: ExtentMappedDevice) throws {
    let size = device.size
    _ = try device.read(at: 0, count: Int(min(size, 64 << 10)))
    if size > 64 << 10 { _ = try device.read(at: size - 4096, count: 4096) }
    let extents = try device.status(at: 0, length: min(size, 1 << 20))
    fuzzCheck(extents.reduce(0) { $0 + $1.length } == min(size, 1 << 20), "status does not cover the range asked")
}
