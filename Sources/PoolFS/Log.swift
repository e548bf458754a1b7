#if canImport(Glibc)
import Glibc
#endif
import Block
import Synchronization

/// Messages for the person running the mount: to stderr while in the foreground, to syslog always
/// (a daemonized mount has no terminal).
public enum Log {
    private static let toStderr = Atomic<Bool>(true)

    public static func configure(foreground: Bool) {
        openlog("poolfs", LOG_PID, LOG_DAEMON)
        toStderr.store(foreground, ordering: .relaxed)
    }

    public static func error(_ message: String) { write(LOG_ERR, message) }
    public static func warning(_ message: String) { write(LOG_WARNING, message) }
    public static func info(_ message: String) { write(LOG_INFO, message) }

    private static func write(_ priority: Int32, _ message: String) {
        // Names in messages come from the pool and from images: none may forge a line or send
        // a terminal an escape sequence.
        let message = Printable.controlsEscaped(message)
        // "%s" takes a C string: a Swift String passed as a CVarArg came out as garbage.
        message.withCString { text in withVaList([text]) { vsyslog(priority, "%s", $0) } }
        if toStderr.load(ordering: .relaxed) {
            let line = Array("poolfs: \(message)\n".utf8)
            line.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
        }
    }
}
