// libFuzzer target: `-o` option lists. The input is one or more lists separated by NUL bytes
// (as repeated `-o` arguments), parsed with `MountOptions.parse`. A crash, a hang, or an error
// other than `MountError` is a finding; a parsed value must respect the documented ranges.
import FuzzSupport
import PoolFS

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let lists = FuzzInput(data, size).bytes.split(separator: 0, omittingEmptySubsequences: false)
        .map { String(decoding: $0, as: UTF8.self) }
    do {
        let options = try MountOptions.parse(lists)
        fuzzCheck((1...256).contains(options.threads), "threads=\(options.threads) accepted")
        fuzzCheck((4096...(1 << 20)).contains(options.maxRead), "max_read=\(options.maxRead) accepted")
        fuzzCheck(!(options.rw && options.cow), "rw and cow accepted together")
        fuzzCheck(!options.cacheDirectory.isEmpty, "an empty cache_dir accepted")
    } catch is MountError {
    } catch {
        untypedError(error, "mount options")
    }
    return 0
}
