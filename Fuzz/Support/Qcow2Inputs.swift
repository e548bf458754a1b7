@testable import Block

/// The backing file and external data file names the header asks for, as the engine reads them;
/// none when the header does not parse (the engine then refuses the image before opening any).
public func referencedFiles(_ bytes: UnsafeRawBufferPointer) -> [String] {
    guard bytes.count >= 72 else { return [] }
    let first = Array(bytes.prefix(2 << 20))
    guard let header = try? Header.parse(first, fileSize: UInt64(bytes.count), path: "input"),
          first.count >= Int(header.clusterSize) || first.count == bytes.count else { return [] }
    let cluster = Array(first.prefix(Int(header.clusterSize)))
    guard let extensions = try? HeaderExtensions.parse(cluster: cluster, header: header) else { return [] }
    var names: [String] = []
    if header.backingFileOffset != 0, header.backingFileSize > 0 {
        let start = Int(header.backingFileOffset)
        // A name past the bytes the engine reads is its bug to find: let it open the image.
        if start + Int(header.backingFileSize) <= cluster.count {
            names.append(String(decoding: cluster[start..<start + Int(header.backingFileSize)], as: UTF8.self))
        }
    }
    if header.hasExternalDataFile, let name = extensions.externalDataFile { names.append(name) }
    return names
}

/// A plain file name: it resolves inside the scratch directory.
public func isLocalName(_ name: String) -> Bool {
    let bytes = Array(name.utf8.prefix { $0 != 0 })
    return !bytes.contains(UInt8(ascii: "/")) && !bytes.allSatisfy { $0 == UInt8(ascii: ".") }
}
