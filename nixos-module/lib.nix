# Pure helpers of the NixOS module: a TOML writer and a base64 decoder. They take nixpkgs' lib
# and nothing else, so nixos-module/tests/eval.nix tests them (and the module) with lib alone.
#
# Why the module writes TOML itself rather than through pkgs.formats.toml: that format renders
# in a build (remarshal), so the text would exist only after building, and a test without the
# whole of nixpkgs could only check a stand-in renderer. Written here at evaluation time, the
# text that lands in /etc/nix/offload.toml is the text the tests parse with the real binary.
# The subset is small: nix-offload's schema uses tables, arrays of tables, strings, integers,
# floats, booleans and arrays.
{ lib }:

let
  inherit (builtins)
    all
    attrNames
    concatStringsSep
    elem
    filter
    fromJSON
    genList
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    length
    listToAttrs
    match
    replaceStrings
    sort
    stringLength
    substring
    toJSON
    typeOf
    ;
  inherit (lib) concatMapStrings imap1 nameValuePair;

  # Keys of nix-offload's schema, in the order the README documents them; any other key
  # follows in alphabetical order.
  keyOrder = [
    "daemon"
    "ssh"
    "socket"
    "state-dir"
    "metrics"
    "host"
    "port"
    "user"
    "ssh-key"
    "host-key"
    "known-hosts"
    "connect-timeout"
    "server-alive-interval"
    "systems"
    "parallel-builds"
    "speed"
    "features"
    "mandatory-features"
    "remote-store"
    "enabled"
    "min-free-space"
    "max-load"
    "machine"
  ];

  sortKeys =
    names:
    filter (k: elem k names) keyOrder ++ sort (a: b: a < b) (filter (k: !elem k keyOrder) names);

  # DEL (U+007F) is the one character toJSON leaves alone that TOML wants escaped.
  del = fromJSON ''"\u007f"'';

  dropNulls = attrs: lib.filterAttrs (_: v: v != null) attrs;

  isTableArray = v: isList v && v != [ ] && all isAttrs v;

  describe =
    v:
    if builtins.isPath v then
      "a Nix path; write it as a string, so that the file is not copied into the world-readable Nix store"
    else
      "a ${typeOf v}";
in
rec {
  # The values `settings` accepts: what TOML can hold. null means "leave the key out", so that
  # an option can unset a value; there are no paths, because a path in a Nix string is copied
  # into the store, and a key file must never be.
  tomlValueType =
    let
      valueType =
        lib.types.nullOr (
          lib.types.oneOf [
            lib.types.bool
            lib.types.int
            lib.types.float
            lib.types.str
            (lib.types.listOf valueType)
            (lib.types.attrsOf valueType)
          ]
        )
        // {
          description = "TOML value";
        };
    in
    valueType;

  # A TOML basic string. JSON's string escapes are a subset of TOML's (\" \\ \b \f \n \r \t
  # \uXXXX), and toJSON escapes every control character but DEL.
  tomlString = s: replaceStrings [ del ] [ "\\u007f" ] (toJSON s);

  tomlKey = k: if match "[A-Za-z0-9_-]+" k != null then k else tomlString k;

  # toJSON writes 2.0 as "2", which TOML would read as an integer.
  tomlFloat =
    f:
    let
      s = toJSON f;
    in
    if match "-?[0-9]+" s != null then s + ".0" else s;

  # One value on the right of "key = ": arrays and tables inline. path names the value in
  # errors ("settings.ssh.user").
  tomlInline =
    path: v:
    if isString v then
      tomlString v
    else if isBool v then
      (if v then "true" else "false")
    else if isInt v then
      toString v
    else if isFloat v then
      tomlFloat v
    else if isList v then
      "[" + concatStringsSep ", " (imap1 (i: x: tomlInline "${path}[${toString i}]" x) v) + "]"
    else if isAttrs v then
      let
        a = dropNulls v;
      in
      "{ "
      + concatStringsSep ", " (map (k: "${tomlKey k} = ${tomlInline "${path}.${k}" a.${k}}") (sortKeys (attrNames a)))
      + " }"
    else if v == null then
      throw "nix-offload: ${path}: null inside a list cannot be written as TOML; leave the element out"
    else
      throw "nix-offload: ${path}: cannot be written as TOML: it is ${describe v}";

  # The body of a table: its plain keys first, then its tables ([a.b]), then its arrays of
  # tables ([[a.b]]), as TOML requires. Keys whose value is null are left out.
  tomlBody =
    path: attrs:
    let
      a = dropNulls attrs;
      names = sortKeys (attrNames a);
      plain = filter (k: !(isAttrs a.${k}) && !(isTableArray a.${k})) names;
      tables = filter (k: isAttrs a.${k}) names;
      arrays = filter (k: isTableArray a.${k}) names;
      header = k: concatStringsSep "." (map tomlKey (path ++ [ k ]));
      name = k: concatStringsSep "." (path ++ [ k ]);
    in
    concatMapStrings (k: "${tomlKey k} = ${tomlInline (name k) a.${k}}\n") plain
    + concatMapStrings (k: "\n[${header k}]\n" + tomlBody (path ++ [ k ]) a.${k}) tables
    + concatMapStrings (
      k: concatMapStrings (e: "\n[[${header k}]]\n" + tomlBody (path ++ [ k ]) e) a.${k}
    ) arrays;

  # toTOML renders an attribute set as a TOML document.
  toTOML =
    attrs:
    let
      s = tomlBody [ ] attrs;
    in
    if substring 0 1 s == "\n" then substring 1 (stringLength s - 1) s else s;

  # decodeBase64Text decodes standard base64 (with or without "=" padding; newlines are
  # ignored) whose content is printable ASCII text, tabs and newlines, such as a public key
  # line. It returns null for anything else: Nix strings cannot hold arbitrary bytes, and a
  # key line never has any.
  decodeBase64Text =
    s:
    let
      alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
      sixBits = listToAttrs (genList (i: nameValuePair (substring i 1 alphabet) i) 64);
      printable = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
      byteChar =
        listToAttrs (genList (i: nameValuePair (toString (i + 32)) (substring i 1 printable)) 95)
        // {
          "9" = "\t";
          "10" = "\n";
          "13" = "\r";
        };
      clean = replaceStrings [ "\n" "\r" ] [ "" "" ] s;
      unpadded =
        let
          m = match "([^=]*)(=?=?)" clean;
        in
        if m == null then null else m;
      body = if unpadded == null then "" else builtins.elemAt unpadded 0;
      padding = if unpadded == null then "" else builtins.elemAt unpadded 1;
      n = stringLength body;
      values = map (c: sixBits.${c} or null) (lib.stringToCharacters body);
      wellFormed =
        unpadded != null
        && n > 0
        && lib.mod n 4 != 1
        && !(elem null values)
        && (padding == "" || lib.mod (n + stringLength padding) 4 == 0);
      group =
        g:
        let
          vs = lib.sublist (g * 4) 4 values;
          v = i: if i < length vs then builtins.elemAt vs i else 0;
          word = v 0 * 262144 + v 1 * 4096 + v 2 * 64 + v 3;
          bytes = [
            (word / 65536)
            (lib.mod (word / 256) 256)
            (lib.mod word 256)
          ];
        in
        lib.take (length vs - 1) bytes;
      allBytes = lib.concatMap group (genList (g: g) ((n + 3) / 4));
      chars = map (b: byteChar.${toString b} or null) allBytes;
    in
    if wellFormed && !(elem null chars) then concatStringsSep "" chars else null;
}
