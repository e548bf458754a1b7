/// Names from pools (qcow2 snapshot names, nested zvols) as single file names: `%`, `/` and `@`
/// become `%25`, `%2F` and `%40`, and `.` and `..` become `%2E` and `%2E%2E`.
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
            default: out.append(ch)
            }
        }
        return out
    }
}
