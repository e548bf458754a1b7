#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Which processes hold a file or a device, to name them when a volume is in use: QEMU's image
/// locks on a file (QemuLocks.swift), or a block device open. Links in /proc/PID/fd are read and
/// never followed, except those naming a node in /dev: a stat of another process's file could wait
/// on a stuck FUSE server. Meant for a command reporting a refusal, not for a FUSE request path:
/// it reads every process's descriptor table.
public enum LockHolders {
    public struct Holder: Equatable, CustomStringConvertible, Sendable {
        public var pid: Int32
        /// The program's name: argv[0]'s last component (comm is cut to 15 characters).
        public var program: String
        public var description: String { "\(program) (pid \(pid))" }
    }

    /// The processes other than this one that hold a QEMU lock byte of the file at `path`, by pid.
    /// QEMU's locks are OFD locks, which /proc/locks lists with pid -1; but each process's
    /// /proc/PID/fdinfo/FD lists, on "lock:" lines in the /proc/locks format, the locks held
    /// through that open file (proc(5)). So: every descriptor whose link names the file, then its
    /// fdinfo lines for the file's device:inode and a byte of QEMU's range (100-103, 200-203).
    public static func qemuLocks(on path: String) -> [Holder] {
        var st = stat()
        guard stat(path, &st) == 0 else { return [] }
        let target = URL(fileURLWithPath: path).resolvingSymlinksInPath().path
        let (major, minor) = split(UInt64(st.st_dev))
        let file = String(format: "%02x:%02x:%llu", major, minor, UInt64(st.st_ino))
        return processes { link, pid, fd in
            guard link == target,
                  let info = try? String(contentsOfFile: "/proc/\(pid)/fdinfo/\(fd)", encoding: .utf8) else { return false }
            return info.split(separator: "\n").contains { line in
                // "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:16229047 100 101"
                let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                guard f.count >= 9, f[0] == "lock:", f[6] == file,
                      let start = UInt64(f[7]), let end = UInt64(f[8]) ?? (f[8] == "EOF" ? .max : nil) else { return false }
                return start <= 203 && end >= 100
            }
        }
    }

    /// The processes other than this one with the block device `device` (a dev_t) open, by pid.
    /// Only descriptors whose link names a node in /dev are stat'ed.
    public static func openers(ofBlockDevice device: UInt64) -> [Holder] {
        processes { link, pid, fd in
            var target = stat()
            return link.hasPrefix("/dev/") && stat("/proc/\(pid)/fd/\(fd)", &target) == 0
                && target.st_mode & S_IFMT == S_IFBLK && UInt64(target.st_rdev) == device
        }
    }

    /// Linux's dev_t as major and minor: 12 bits of major and 20 of minor, each split in two.
    public static func split(_ device: UInt64) -> (major: UInt64, minor: UInt64) {
        (((device >> 8) & 0xfff) | ((device >> 32) & ~0xfff), (device & 0xff) | ((device >> 12) & ~0xff))
    }

    /// The processes other than this one with a descriptor that `holds` takes, given the
    /// descriptor's link (read, not followed), the pid and the descriptor's number; by pid.
    static func processes(holding holds: (_ link: String, _ pid: Int32, _ fd: String) -> Bool) -> [Holder] {
        let me = getpid()
        let fm = FileManager.default
        var holders: [Holder] = []
        for entry in (try? fm.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), pid != me,
                  let fds = try? fm.contentsOfDirectory(atPath: "/proc/\(pid)/fd") else { continue }
            let held = fds.contains { fd in
                guard let link = try? fm.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)") else { return false }
                return holds(link, pid, fd)
            }
            if held { holders.append(Holder(pid: pid, program: program(pid))) }
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
