import ArgumentParser
import CHostIO
import Dispatch
import Foundation
import PoolFS
import Pools
import Block
import Synchronization

/// `poolfs snapshot create|revert|delete`: one snapshot operation on every volume of a pool (or
/// the ones named), several at once. Each pool does the operation its own way
/// (`Pool.snapshot`, PoolSnapshotting.swift); this command lists, runs in parallel and reports.
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Create, revert or delete a snapshot on every volume of a pool.",
        discussion: """
        Resets a classroom of VMs: take a snapshot before the lesson,
        revert every disk to it afterwards. Each volume is one row of the
        result: done, skipped (a raw file, which cannot hold internal
        snapshots; no snapshot of that name; in use by a running VM or
        qemu-img, which is never touched) or failed, with the reason. The
        exit status is non-zero if any volume was skipped or failed.
          dir pools: qcow2 internal snapshots, written by poolfs's own
          qcow2 engine as qemu-img snapshot -c, -a and -d write them; a
          crash at any point leaves each image in its old or its new
          state.
          zfs pools: zfs snapshot, zfs rollback and zfs destroy on each
          zvol. A rollback to a snapshot older than the zvol's latest
          fails unless --force, which runs zfs rollback -r: it DESTROYS
          the snapshots taken after it.
          rbd pools: rbd_snap_create, rbd_snap_rollback and
          rbd_snap_remove on each image; an image whose exclusive lock
          another client (a running VM) holds is skipped.
          logical pools (LVM, through device-mapper only): the snapshot
          NAME of volume VOL is the LV VOL+NAME (LV names are VG-wide;
          NAME has letters, digits, . _ - and no +), shown as
          .snapshots/VOL/NAME. create takes a thin snapshot of a thin
          LV, and of any other LV a classic snapshot whose COW is
          -o cow_size=SIZE or N% of the origin (default 20%, rounded up
          to extents, at least one); a COW that fills up invalidates
          the snapshot. revert of a classic snapshot merges it into
          the volume (lvconvert --merge, waited for), then takes it
          again with the same COW size; of a thin snapshot, makes the
          LV a new thin snapshot of it under the LV's name and takes it
          again, dropping the old data (--force when the volume has
          other thin snapshots: they become LVs of their own). delete
          is lvremove. A volume or snapshot whose device is open (a
          running VM, a file of it open through a poolfs mount) is
          skipped with what holds it: lvm2 would merge into an open
          origin only at its next activation. Without device-mapper
          (-o noactivate, or a kernel without it) nothing is tried.
          Other pool types are not supported yet.
        """,
        subcommands: [Create.self, Revert.self, Delete.self])

    struct Common: ParsableArguments {
        @Option(name: .long, help: "Pool type, as poolfs mount takes it.", completion: .list(poolTypes))
        var type: String?

        @Option(name: .customShort("o"), help: ArgumentHelp("Pool options, as poolfs mount -o takes them.", valueName: "options"),
                completion: .list(mountOptionNames))
        var options: [String] = []

        @Flag(name: .long, help: "Say what would be done, and change nothing.")
        var dryRun = false

        @Flag(name: .long, help: "Print JSON.")
        var json = false

        @Option(name: .long, help: "Volumes worked on at once.")
        var jobs: Int = 8

        @Argument(help: "The pool, as poolfs mount takes it.", completion: .file())
        var source: String

        @Argument(help: "The snapshot's name.")
        var name: String

        @Argument(help: "The volumes to work on (default: every volume of the pool).")
        var volumes: [String] = []
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Take a snapshot of every volume.")
        @OptionGroup var common: Common
        @Flag(name: .long, help: "Replace a snapshot of the same name (otherwise that volume fails).")
        var replace = false
        func run() throws { try SnapshotRun(operation: .create(replace: replace), common: common).run() }
    }

    struct Revert: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Put every volume back to the snapshot.")
        @OptionGroup var common: Common
        @Flag(name: .long, help: "zfs: roll back past later snapshots (zfs rollback -r), destroying them. logical: revert a thin LV that has other snapshots (they become LVs of their own).")
        var force = false
        func run() throws { try SnapshotRun(operation: .revert(force: force), common: common).run() }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Delete the snapshot from every volume.")
        @OptionGroup var common: Common
        func run() throws { try SnapshotRun(operation: .delete, common: common).run() }
    }
}

/// One row of the result.
struct SnapshotOutcome: Codable, Sendable {
    enum Status: String, Codable, Sendable { case done, skipped, failed, wouldDo = "would do" }
    var volume: String
    var status: Status
    var reason: String?
}

struct SnapshotRun {
    /// Punches left for the end at most (each holds a descriptor and the image's lock).
    static let maxPendingPunches = 128
    /// The pool types `Pool.snapshot` works on.
    static let supportedTypes: Set<String> = ["dir", "fs", "netfs", "logical", "zfs", "rbd"]
    let operation: SnapshotOperation
    let common: SnapshotCommand.Common

    func run() throws {
        // Each volume's transaction allocates and frees a few MB (tables read, counts, staged
        // copies). By default glibc maps allocations over 128 KiB afresh and gives freed memory
        // back, so every volume page-faulted all of it in again: 8,800 faults, a fifth of the CPU
        // of a 30-volume revert. Kept instead, in this short-lived command.
        poolfs_keep_freed_memory(64 << 20, 256 << 20)
        let outcomes: [SnapshotOutcome]
        do {
            guard common.jobs >= 1 else { throw UsageError(description: "--jobs must be at least 1") }
            var parsed = try MountOptions.parse(common.options)
            if let type = common.type { parsed.type = type }
            if let type = parsed.type, !Self.supportedTypes.contains(type) {
                throw UsageError(description: "snapshot: not supported yet for this pool type (\(type)); dir, logical, zfs and rbd pools only")
            }
            // Said before the volume group is read: lvs works without device-mapper, snapshots do not.
            if parsed.type == "logical", let refusal = LogicalPool.snapshotRefusal(noactivate: parsed.noactivate) {
                throw UsageError(description: "snapshot: \(refusal) (\(common.source))")
            }
            let pool = try Mounter.openPool(common.source, options: parsed)
            defer { _ = pool.release() }
            if let refusal = pool.snapshotRefusal {
                throw UsageError(description: "snapshot: \(refusal) (\(pool.displayName))" + (pool is LogicalPool ? "" : "; dir, logical, zfs and rbd pools only"))
            }
            let names = common.volumes.isEmpty ? try pool.volumeNames() : common.volumes
            var stderr = StandardError()
            print("poolfs: snapshot \(operation.verb) '\(common.name)' on \(names.count) volume\(names.count == 1 ? "" : "s") of \(pool.displayName)\(common.dryRun ? " (dry run)" : "")...", to: &stderr)
            outcomes = run(on: names, in: pool)
        } catch {
            throw fail(error)
        }
        print(common.json ? json(outcomes) : table(outcomes))
        if outcomes.contains(where: { $0.status == .skipped || $0.status == .failed }) { throw ExitCode.failure }
    }

    /// Every volume, `jobs` at a time; the rows in the order of `names`. Threads of their own,
    /// not `concurrentPerform`, which runs as many as there are CPUs: each volume mostly waits on
    /// the disk (two fdatasyncs, a hole punched), and the waits of different files overlap.
    /// Every volume's operation is done (and durable) before any freed clusters are punched:
    /// a punch's journal commit (and, with the `discard` mount option, its discards) would
    /// otherwise hold up the next volume's fdatasync.
    func run(on names: [String], in pool: any Pool) -> [SnapshotOutcome] {
        let results = Mutex<[SnapshotOutcome?]>(Array(repeating: nil, count: names.count))
        let punches = Mutex<[PendingPunch]>([])
        inParallel(names.count) { i in
            let (outcome, punch) = run(names[i], in: pool)
            results.withLock { $0[i] = outcome }
            // Each waiting punch keeps its image open and locked: past a bound, the oldest goes now.
            let overflow = punch.flatMap { punch in
                punches.withLock { $0.append(punch); return $0.count > Self.maxPendingPunches ? $0.removeFirst() : nil }
            }
            overflow?.run()
        }
        let pending = punches.withLock { $0 }
        inParallel(pending.count) { i in pending[i].run() }
        return results.withLock { $0.map { $0! } }
    }

    /// `work(0..<count)` on up to `jobs` threads.
    func inParallel(_ count: Int, _ work: @escaping @Sendable (Int) -> Void) {
        let next = Atomic<Int>(0)
        let done = DispatchGroup()
        for _ in 0..<min(common.jobs, count) {
            done.enter()
            Thread {
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    guard i < count else { break }
                    work(i)
                }
                done.leave()
            }.start()
        }
        done.wait()
    }

    func run(_ name: String, in pool: any Pool) -> (SnapshotOutcome, PendingPunch?) {
        func row(_ status: SnapshotOutcome.Status, _ reason: String? = nil) -> SnapshotOutcome {
            SnapshotOutcome(volume: name, status: status, reason: reason)
        }
        do {
            let punch = try pool.snapshotLeavingPunch(operation, common.name, of: name, dryRun: common.dryRun)
            return (row(common.dryRun ? .wouldDo : .done), punch)
        } catch let skip as SnapshotSkip {
            return (row(.skipped, skip.description), nil)
        } catch {
            return (row(.failed, "\(error)"), nil)
        }
    }

    func table(_ rows: [SnapshotOutcome]) -> String {
        let width = max(6, rows.map(\.volume.count).max() ?? 0)
        var lines = ["VOLUME".padding(toLength: width, withPad: " ", startingAt: 0) + "  STATUS    REASON"]
        for r in rows {
            lines.append(r.volume.padding(toLength: width, withPad: " ", startingAt: 0) + "  "
                         + r.status.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0) + "  " + (r.reason ?? ""))
        }
        // Trailing blanks trimmed by hand: a regular expression per row cost milliseconds of a
        // run that takes a tenth of a second.
        return lines.map { String($0.reversed().drop(while: \.isWhitespace).reversed()) }.joined(separator: "\n")
    }

    func json(_ rows: [SnapshotOutcome]) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: (try? encoder.encode(rows)) ?? Data("[]".utf8), as: UTF8.self)
    }
}

/// A refusal stated in full, printed as `poolfs: description`.
struct UsageError: Error, CustomStringConvertible {
    let description: String
}
