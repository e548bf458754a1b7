#if canImport(Glibc)
import Glibc
#endif
import Block

extension DirectoryPool {
    /// A vmdk descriptor is at most this big here: the descriptors qemu-img and VMware write
    /// are a few hundred bytes, so listing a directory reads little.
    static let descriptorReadLimit = 64 << 10

    /// The files of `names` that a vmdk descriptor among them names as its extents: they are
    /// data of that volume, not volumes of their own. Only files of at most 64 KiB, inside the
    /// pool, whose kept format decision (FormatDecisions) is vmdk, are read as descriptors.
    func vmdkExtentNames(among names: [String]) -> Set<String> {
        var hidden = Set<String>()
        for name in names {
            let full = path + "/" + name
            var st = stat()
            guard stat(full, &st) == 0, st.st_mode & S_IFMT == S_IFREG, st.st_size >= 4,
                  st.st_size <= Self.descriptorReadLimit,
                  let file = try? HostFile(path: full),
                  let opened = file.openedPath, policy.root(of: opened) != nil,
                  (try? formats.decide(file))?.format == .vmdk,
                  let bytes = try? file.readBytes(at: 0, count: Int(min(file.size, UInt64(Self.descriptorReadLimit)))),
                  let extents = VmdkDescriptor.extentFileNames(ofDescriptor: bytes) else { continue }
            hidden.formUnion(extents.filter { $0 != name })
        }
        return hidden
    }
}
