derivation {
  name = "escapes";
  system = "x86_64-linux";
  builder = "/bin/sh";
  args = [ "-c" "x=\"quoted\"; y='back\\slash'; printf 'tab\there\nnewline\n' > $out" "dollar $HOME \${literal}" ];
  "odd\"key" = "value with \"quotes\" and \\ backslash";
}
