#if canImport(Glibc)
import Glibc
#endif
import Locking

/// Memory for cached blocks. Cluster-sized blocks come from mmap and go back to a small free list
/// when evicted, so that a cache that churns (a sequential read of a compressed image) reuses the
/// same pages: no malloc fragmentation growing the process past its cache size, and no syscall
/// per cluster once the cache is full.
enum BlockMemory {
    /// Blocks at least this large are mmap'd and recycled; smaller ones use malloc.
    static let pooledMinimum = 16 << 10
    /// How many bytes of free blocks are kept for reuse.
    static let freeListBytes = 16 << 20

    private static let free = Locked<(blocks: [Int: [UnsafeMutableRawPointer]], bytes: Int)>(([:], 0))

    static func allocate(_ count: Int) -> UnsafeMutableRawPointer {
        guard count >= pooledMinimum else {
            return UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 64)
        }
        let reused = free.withLock { state -> UnsafeMutableRawPointer? in
            guard let block = state.blocks[count]?.popLast() else { return nil }
            state.bytes -= count
            return block
        }
        if let reused { return reused }
        guard let mapped = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              mapped != MAP_FAILED else {
            // Out of address space: the caller cannot continue either way.
            fatalError("poolfs: cannot map \(count) bytes for a cache block (errno \(errno))")
        }
        return mapped
    }

    static func release(_ block: UnsafeMutableRawPointer, count: Int) {
        guard count >= pooledMinimum else { return block.deallocate() }
        let kept = free.withLock { state -> Bool in
            guard state.bytes + count <= freeListBytes else { return false }
            state.blocks[count, default: []].append(block)
            state.bytes += count
            return true
        }
        if !kept { munmap(block, count) }
    }
}

extension UnsafeMutableRawPointer: @retroactive @unchecked Sendable {}
