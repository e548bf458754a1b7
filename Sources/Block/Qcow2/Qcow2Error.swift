#if canImport(Glibc)
import Glibc
#endif

/// Every way opening or reading an image can fail. Each case names what is wrong and where, so a
/// volume that cannot be opened can say why (in `poolfs ls`, in the log).
public enum Qcow2Error: Error, Equatable, CustomStringConvertible {
    /// The file does not start with the qcow2 magic "QFI\xfb".
    case notQcow2(path: String)
    case unsupportedVersion(UInt32)
    /// `crypt_method` is non-zero (1: the old AES-CBC method, 2: LUKS), or the image has a
    /// full-disk-encryption (LUKS) header extension (method 2).
    case encrypted(method: UInt32)
    /// An incompatible feature bit this engine does not implement; `name` comes from the image's
    /// feature name table when it has one.
    case unsupportedFeature(bit: Int, name: String?)
    /// The image is not what it claims: `offset` is the byte position in the file where the bad
    /// value was read (or the table it points to).
    case corrupt(String, offset: UInt64)
    case backing(String)
    case io(errno: Int32, operation: String, path: String)
    /// Another program holds the image in a way that excludes this use (QEMU's image locks).
    case inUse(String)
    /// A write this engine will not do, and why; nothing was changed.
    case writeRefused(String)
    /// A file the image names (or the image itself) that poolfs will not open under its trust
    /// rules (docs/security.md): outside the pool, not a regular file, a protocol, unreadable
    /// by the image's owner, or a format that may not name files. Reported as EACCES.
    case refused(String)
    /// The image is of a format poolfs recognises but does not read (yet); never served as raw.
    case unsupportedFormat(String)
    /// A format poolfs reads but does not write (everything but raw and qcow2): EROFS.
    case readOnlyFormat(String)
    /// An image of a recognised format (QEMU's name) that cannot be read: no reader for the
    /// format, or the format's reader refused it. The volume still shows the format.
    case unreadable(format: String, why: String)

    public var description: String {
        switch self {
        case .notQcow2(let path):
            return "\(path): not a qcow2 image"
        case .unsupportedVersion(1):
            return "qcow version 1 is not supported (unsupported qcow2 version 1); convert it with qemu-img convert -O qcow2"
        case .unsupportedVersion(let version):
            return "unsupported qcow2 version \(version)"
        case .encrypted(1):
            return "qcow2 images encrypted with the old AES method (crypt_method 1, encrypt.format=aes) are not supported"
        case .encrypted(2):
            return "qcow2 images encrypted with LUKS (crypt_method 2, encrypt.format=luks) are not supported"
        case .encrypted(let method):
            return "qcow2 encryption method \(method) is unknown and not supported"
        case .unsupportedFeature(let bit, let name):
            let named = name.map { " (\($0))" } ?? ""
            return "unsupported incompatible feature bit \(bit)\(named)"
        case .corrupt(let what, let offset):
            return "corrupt image: \(what) (at byte \(offset))"
        case .backing(let what):
            return "backing chain: \(what)"
        case .io(let errno, let operation, let path):
            return "\(operation) \(path): \(String(cString: strerror(errno)))"
        case .inUse(let why):
            return "image in use: \(why)"
        case .writeRefused(let why):
            return "write refused: \(why)"
        case .refused(let why):
            return "refused: \(why)"
        case .readOnlyFormat(let why):
            return "read-only: \(why)"
        case .unsupportedFormat(let why), .unreadable(_, let why):
            return why
        }
    }

    /// The errno a filesystem reports for this error: I/O errors keep theirs, everything else is EIO.
    public var errno: Int32 {
        switch self {
        case .io(let code, _, _): return code
        case .inUse: return EBUSY
        case .refused: return EACCES
        case .readOnlyFormat: return EROFS
        default: return EIO
        }
    }

    /// The format an image was recognised as, when it could not be read.
    public var recognisedFormat: String? {
        if case .unreadable(let format, _) = self { return format }
        return nil
    }
}
