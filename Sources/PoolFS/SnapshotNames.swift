import Pools
import Block

/// File names for snapshots under `.snapshots/<volume>/`.
///
/// qcow2 snapshot names may contain `/`, may be empty and need not be unique; file names cannot
/// and must. The rules:
/// - `%`, `/` and `@` are written as `%25`, `%2F` and `%40`; a name of `.` or `..` as `%2E`, `%2E%2E`.
/// - A name that several snapshots share, or an empty one, gets `@<id>` appended: two snapshots
///   called `daily` with ids 3 and 7 appear as `daily@3` and `daily@7`.
/// So every snapshot has exactly one file name and every file name one snapshot.
public enum SnapshotNames {
    public static func escape(_ name: String) -> String { FileNames.escape(name) }

    /// File name → snapshot, for a volume's snapshot table.
    /// Names over 255 bytes are cut with a hash (`TreeNames.limited`); a (name, id) pair that
    /// several snapshots share gets `~2`, `~3`... in table order.
    public static func files(for snapshots: [Snapshot]) -> [(file: String, snapshot: Snapshot)] {
        var counts: [String: Int] = [:]
        for s in snapshots { counts[s.name, default: 0] += 1 }
        var taken: Set<String> = []
        taken.reserveCapacity(snapshots.count)
        return snapshots.map { s in
            let unique = counts[s.name] == 1 && !s.name.isEmpty
            let whole = unique ? escape(s.name) : escape(s.name) + "@" + escape(s.id)
            var file = TreeNames.limited(whole, whole: whole)
            var n = 2
            while !taken.insert(file).inserted {
                file = TreeNames.limited(whole + "~\(n)", whole: whole + "~\(n)")
                n += 1
            }
            return (file, s)
        }
    }
}
