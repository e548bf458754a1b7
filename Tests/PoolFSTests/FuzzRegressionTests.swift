@testable import PoolFS
import Testing

/// Inputs the libFuzzer targets (Fuzz/, `make fuzz`) found a bug with, built here; each stays as
/// a named test.
@Suite("Fuzz regressions: mount options")
struct MountOptionsFuzzRegressionTests {
    /// FuzzMountOptions: an option that is only "=" (or starts with it) has no name; splitting it
    /// on "=" gave no parts and indexing the first trapped.
    @Test(arguments: ["=", "ro,=,noatime", "=4", "==x"])
    func optionWithoutNameIsRefused(_ list: String) {
        #expect(message { try MountOptions.parse([list]) }?.hasSuffix("no option name before '='") == true)
    }

    /// A cache or COW memory size above Int.max trapped converting to Int.
    @Test(arguments: ["cache_size=9223372036854775808", "cow_memory=8388608T"])
    func sizeBeyondMemoryIsRefused(_ list: String) {
        #expect(message { try MountOptions.parse([list]) }?.hasSuffix("is too large") == true)
    }

    func message(_ body: () throws -> MountOptions) -> String? {
        do {
            _ = try body()
            return nil
        } catch {
            return (error as? MountError)?.description
        }
    }
}
