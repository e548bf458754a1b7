#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Which processes hold QEMU's image locks (QemuLocks.swift) on a file, to name them when an image
/// is in use. QEMU's locks are OFD locks, which /proc/locks lists with pid -1; but each process's
/// /proc/PID/fdinfo/FD lists, on "lock:" lines in the /proc/locks format, the locks held through
/// that open file (proc(5)). So: every descriptor of every process whose link names the file,
/// then its fdinfo lines for the file's device:inode and a byte of QEMU's range (100-103, 200-203).
/// The links are read, never followed: a stat of another process's file could wait on a stuck
/// FUSE server. Meant for a command reporting a refusal, not for a FUSE request path: it reads
/// every process's descriptor table.
public enum LockHolders {
    public struct Holder: Equatable, CustomStringConvertible, Sendable {
        public var pid: Int32
        /// The program's name: argv[0]'s last component (comm is cut to 15 characters).
        public var program: String
        public var description: String { "\(program) (pid \(pid))" }
    }

    /// The processes other than this one that hold a QEMU lock byte of the file at `path`, by pid.
    public static func qemuLocks(on path: String) -> [Holder] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [] }
        let target = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        let device = UInt64(st.st_dev)
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~0xfff)
        let minor = (device & 0xff) | ((device >> 12) & ~0xff)
        let file = String(format: "%02x:%02x:%llu", major, minor, UInt64(st.st_ino))
        let me = getpid()
        var holders: [Holder] = []
        let fm = FileManager.default
        for entry in (try? fm.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), pid != me,
                  let fds = try? fm.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { continue }
            let holds = fds.contains { fd in
                guard (try? fm.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) == target,
                      let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8) else { return false }
                return info.split(separator: "\n").contains { line in
                    // "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:16229047 100 101"
                    let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                    guard f.count >= 9, f[0] == "lock:", f[6] == file,
                          let start = UInt64(f[7]), let end = UInt64(f[8]) ?? (f[8] == "EOF" ? .max : nil) else { return false }
                    return start <= 203 && end >= 100
                }
            }
            if holds { holders.append(Holder(pid: pid, program: program(pid))) }
        }
        return holders.sorted { $0.pid < $1.pid }
    }

    static func program(_ pid: Int32) -> String {
        if let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"),
           let argv0 = cmdline.split(separator: 0).first, !argv0.isEmpty {
            return String(decoding: argv0, as: UTF8.self).split(separator: "/").last.map(String.init) ?? "?"
        }
        let comm = (try? String(contentsOfFile: "/proc/\(pid)/comm", encoding: .utf8)) ?? "?"
        return comm.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
