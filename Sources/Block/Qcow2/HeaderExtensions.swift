/// The header extensions that follow the header (docs/interop/qcow2.txt, "Header extensions"):
/// type (4 bytes), length (4 bytes), data padded to a multiple of 8, ended by type 0.
struct HeaderExtensions {
    enum Kind: UInt32 {
        case end = 0
        case backingFormat = 0xe279_2aca
        case featureNameTable = 0x6803_f857
        case bitmaps = 0x2385_2875
        case fullDiskEncryption = 0x0537_be77
        case externalDataFile = 0x4441_5441
    }

    var backingFormat: String?
    var externalDataFile: String?
    var encrypted = false
    /// (type, bit) → name; type 0 is incompatible, 1 compatible, 2 autoclear.
    var featureNames: [FeatureKey: String] = [:]

    struct FeatureKey: Hashable {
        var type: UInt8
        var bit: UInt8
    }

    /// `cluster` is the image's first cluster. Extensions end before the cluster does, and before
    /// the backing file name when the image has one. As in QEMU (qcow2_read_extensions), every
    /// extension that starts before that end must fit before it, its own 8 bytes included:
    /// otherwise the image is refused ("Header extension too large"). Bytes past the end of a
    /// file shorter than a cluster read as zeros, as QEMU reads them.
    static func parse(cluster: [UInt8], header: Header) throws(Qcow2Error) -> HeaderExtensions {
        var result = HeaderExtensions()
        var cluster = cluster
        if cluster.count < Int(header.clusterSize) {
            cluster += [UInt8](repeating: 0, count: Int(header.clusterSize) - cluster.count)
        }
        let r = BigEndianReader(bytes: cluster)
        var at = Int(header.version == 2 ? 72 : header.headerLength)
        at = (at + 7) & ~7
        var end = cluster.count
        if header.backingFileOffset != 0 { end = min(end, Int(header.backingFileOffset)) }
        while at < end {
            guard at + 8 <= end else {
                throw .corrupt("header extension too large: its type and length (8 bytes at \(at)) run past byte \(end)\(endName(header))", offset: UInt64(at))
            }
            let type = r.u32(at)
            let length = Int(r.u32(at + 4))
            let data = at + 8
            guard length <= end - data else {
                throw .corrupt("header extension too large: 0x\(String(type, radix: 16)) of \(length) bytes runs past byte \(end)\(endName(header))", offset: UInt64(at))
            }
            switch Kind(rawValue: type) {
            case .end?:
                return result
            case .backingFormat?:
                result.backingFormat = string(cluster[data..<data + length])
            case .externalDataFile?:
                result.externalDataFile = string(cluster[data..<data + length])
            case .fullDiskEncryption?:
                result.encrypted = true
            case .featureNameTable?:
                guard length % 48 == 0 else {
                    throw .corrupt("feature name table length \(length) is not a multiple of 48", offset: UInt64(at))
                }
                for entry in stride(from: data, to: data + length, by: 48) {
                    let key = FeatureKey(type: cluster[entry], bit: cluster[entry + 1])
                    result.featureNames[key] = string(cluster[entry + 2..<entry + 48])
                }
            case .bitmaps?, nil:
                break  // bitmaps and unknown extensions are skipped
            }
            at = data + ((length + 7) & ~7)
        }
        return result
    }

    /// What ends the room for extensions, for errors.
    private static func endName(_ header: Header) -> String {
        header.backingFileOffset != 0 ? " (backing_file_offset)" : " (the end of the first cluster)"
    }

    /// A NUL-padded byte string.
    static func string(_ bytes: ArraySlice<UInt8>) -> String {
        let trimmed = bytes.prefix { $0 != 0 }
        return String(decoding: trimmed, as: UTF8.self)
    }
}
