@testable import Pools
import Block
import TestSupport
import Testing

/// LVM report inputs that trapped on arithmetic overflow, built here; each stays as a named test.
/// Found by reading ExtentMappedDevice while writing FuzzLVMReport and confirmed with it (1.4
/// million executions of the fuzzer had not reached them: JSON digits mutate slowly).
@Suite("Fuzz regressions: LVM reports")
struct LVMFuzzRegressionTests {
    /// One LV `x` of `segments` (segtype, seg_start, seg_size, stripe_size, seg_pe_ranges) in VG
    /// `testvg` with 4 MiB extents; PVs /dev/loop0 and /dev/loop1 start their extents at 1 MiB.
    static func report(size: String, _ segments: [(String, String, String, String, String)]) throws -> VolumeGroupReport {
        let rows = segments.map { type, start, segmentSize, stripeSize, ranges in
            #"{"lv_name":"x", "vg_name":"testvg", "lv_size":"\#(size)", "lv_attr":"-wi-a-----", "segtype":"\#(type)", "#
                + #""seg_start":"\#(start)", "seg_size":"\#(segmentSize)", "stripe_size":"\#(stripeSize)", "#
                + #""seg_pe_ranges":"\#(ranges)", "lv_path":"/dev/testvg/x"}"#
        }
        return try VolumeGroupReport.parse(
            vg: "testvg", lvs: #"{"report":[{"lv":[\#(rows.joined(separator: ","))]}]}"#,
            vgs: #"{"report":[{"vg":[{"vg_name":"testvg", "vg_extent_size":"4194304"}]}]}"#,
            pvs: #"{"report":[{"pv":[{"pv_name":"/dev/loop0", "vg_name":"testvg", "pe_start":"1048576"},"#
                + #"{"pv_name":"/dev/loop1", "vg_name":"testvg", "pe_start":"1048576"}]}]}"#)
    }

    /// An extent range ending at 2^64 - 1: its extent count (last - first + 1) overflowed.
    @Test func extentRangeToTheLastUInt64IsRefused() throws {
        #expect(throws: VolumeGroupReport.ParseError.field("seg_pe_ranges", value: "/dev/loop0:0-18446744073709551615")) {
            try Self.report(size: "4194304", [("linear", "0", "4194304", "0", "/dev/loop0:0-18446744073709551615")])
        }
    }

    /// Each mapped onto 64 MiB PVs: the number that overflowed, and the error it gives now.
    static let cases: [(String, size: String, segments: [(String, String, String, String, String)], why: String)] = [
        // first extent × extent size = 2^62 × 2^22
        ("first extent far out", "4194304", [("linear", "0", "4194304", "0", "/dev/loop0:4611686018427387904-4611686018427387904")],
         "extents run past the end of /dev/loop0"),
        // extent count × extent size = 2^42 × 2^22
        ("2^42 extents", "4194304", [("linear", "0", "4194304", "0", "/dev/loop0:0-4398046511103")],
         "extents of /dev/loop0 do not match the segment size"),
        // stripe size × stripes = 2^63 × 2
        ("2^63-byte stripes", "8388608", [("striped", "0", "8388608", "9223372036854775808", "/dev/loop0:0-0 /dev/loop1:0-0")],
         "stripe size 9223372036854775808 does not divide the segment"),
        // not an overflow: a linear segment over two ranges read the first past its end
        ("linear over two ranges", "8388608", [("linear", "0", "8388608", "0", "/dev/loop0:0-0 /dev/loop1:0-0")],
         "a linear segment has 2 extent ranges"),
    ]

    @Test(arguments: cases.indices)
    func extentArithmeticIsChecked(_ i: Int) throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 64M pv")
        let report = try Self.report(size: Self.cases[i].size, Self.cases[i].segments)
        let volume = try #require(report.volumes.first)
        #expect(throws: ExtentMappedDevice.MapError.inconsistent(volume: "x", why: Self.cases[i].why), "\(Self.cases[i].0)") {
            _ = try ExtentMappedDevice(volume: volume, in: report) { _ in try HostFile(path: scratch.path("pv")) }
        }
    }
}
