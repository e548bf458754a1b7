/// Names from pools (qcow2 snapshot names, nested zvols) as single file names: `%`, `/` and `@`
/// become `%25`, `%2F` and `%40`, control characters (NUL included) `%XX`, and `.` and `..`
/// become `%2E` and `%2E%2E`.
public enum FileNames {
    public static func escape(_ name: String) -> String {
        if name == "." { return "%2E" }
        if name == ".." { return "%2E%2E" }
        var out = ""
        for ch in name {
            switch ch {
            case "%": out += "%25"
            case "/": out += "%2F"
            case "@": out += "%40"
            // NUL would cut a file name short; other control characters reach terminals raw.
            case _ where ch.unicodeScalars.count == 1 && (ch.unicodeScalars.first!.value < 0x20 || ch.unicodeScalars.first!.value == 0x7f):
                let value = ch.unicodeScalars.first!.value
                out += "%" + (value < 16 ? "0" : "") + String(value, radix: 16, uppercase: true)
            default: out.append(ch)
            }
        }
        return out
    }
}
