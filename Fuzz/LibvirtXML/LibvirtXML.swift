// libFuzzer target: libvirt storage pool definitions (/etc/libvirt/storage/NAME.xml), parsed
// with `PoolSource.parseLibvirt` for the pool's type and target path (and an rbd pool's source). A crash, a hang, or an
// error other than `PoolError` is a finding.
import FuzzSupport
@testable import Pools

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let xml = String(decoding: FuzzInput(data, size).bytes, as: UTF8.self)
    do {
        let parsed = try PoolSource.parseLibvirt(xml, file: "pool.xml")
        fuzzCheck(!parsed.type.isEmpty, "an empty pool type was accepted")
        if parsed.type == "rbd" {
            let source = try PoolSource.parseLibvirtRBD(xml, file: "pool.xml")
            fuzzCheck(!source.pool.isEmpty, "an rbd pool with no Ceph pool name was accepted")
        }
    } catch is PoolError {
    } catch {
        untypedError(error, "libvirt XML")
    }
    return 0
}
