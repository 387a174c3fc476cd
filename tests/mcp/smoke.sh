#!/usr/bin/env bash
# Direct smoke check of the fixtures (no gateway): upstream.py in both modes, client.py for
# every case and every protocol version. Needs `python3 -m pip install mcp==2.3.0`.
#   bash tests/mcp/smoke.sh [PORT]        exit 0 = all good; prints one line per check
set -u
cd "$(dirname "$0")"
PORT=${1:-18950}
U=http://127.0.0.1:$PORT/mcp
C="timeout 60 python3 client.py"
FAIL=0
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

check() { # name, json, python-expr over j
  if python3 -c 'import json,sys; j=json.loads(sys.argv[1]); sys.exit(0 if eval(sys.argv[2]) else 1)' "$2" "$3" 2>/dev/null; then
    echo "ok   $1"
  else
    echo "FAIL $1: $2" | cut -c1-600; FAIL=1
  fi
}
start_http() { # name port [env...]
  local name=$1 port=$2; shift 2
  env "$@" python3 upstream.py http "$name" "$port" >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do
    (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0; sleep 0.2
  done
  echo "FAIL upstream on $port did not start"; FAIL=1
}

start_http up "$PORT" MCP_TOOL_COUNT=1000 MCP_PAGE_SIZE=100 UPSTREAM_TOKEN=s3cret
export MCP_BEARER=s3cret
for v in 2025-06-18 2025-11-25 2026-07-28; do
  j=$($C list_tools $U $v)
  check "http list_tools $v" "$j" "j['version']=='$v' and len(j['names'])>=1007 and j['pages']==11 and j['names'][:2]==['echo','add'] and 'tool_0999' in j['names']"
  j=$($C call $U add '{"a":2,"b":3}' $v)
  check "http call add $v" "$j" "j['text']=='5' and j['isError'] is False"
  j=$($C call $U whoami '{}' $v)
  check "http whoami $v" "$j" "json.loads(j['text'])['credential']=='Bearer s3cret'"
  j=$($C call $U no_such_tool '{}' $v)
  check "http unknown tool $v" "$j" "j['isError'] is True and j['text']=='Unknown tool: no_such_tool'"
  j=$($C resources $U $v)
  check "http resources $v" "$j" "j['uris']==['file:///readme.txt','file:///secret.txt'] and j['read']['file:///secret.txt']=='secret of up'"
  j=$($C prompts $U $v)
  check "http prompts $v" "$j" "j['names']==['greet','admin_reset'] and j['get']['greet']=='Hello, world!'"
  j=$($C watch $U 5 $v mutate 2>/dev/null)
  check "http watch $v" "$j" "j['arrived'] is True and len(j['after'])==len(j['before'])+1"
done
j=$($C session $U 2025-11-25)
check "http session" "$j" "j['version']=='2025-11-25' and len(j['session_id'])>8"
SID=$(python3 -c 'import json,sys;print(json.loads(sys.argv[1])["session_id"])' "$j")
j=$($C replay $U "$SID")
check "http replay live session" "$j" "j['status']==200 and j['names'][0]=='echo'"
j=$($C replay $U 00000000000000000000000000000000)
check "http replay unknown session -> 404" "$j" "j['status']==404 and j['error']['code']==-32600"
j=$($C raw $U '' '{":method":"DELETE","Mcp-Session-Id":"'"$SID"'","MCP-Protocol-Version":"2025-11-25"}')
check "http DELETE session" "$j" "j['status']==200"
j=$($C replay $U "$SID")
check "http replay deleted session -> 404" "$j" "j['status']==404"
j=$(MCP_BEARER= $C list_tools $U 2025-11-25)
check "http no bearer -> error" "$j" "'error' in j"
j=$(MCP_BEARER= $C raw $U '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}' '{}')
check "http no bearer -> 401" "$j" "j['status']==401"
j=$($C raw $U '{bad' '{}')
check "http parse error" "$j" "j['status']==400 and j['error']['code']==-32700"
j=$($C raw $U '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}' '{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/call","Mcp-Name":"add"}')
check "http Mcp-Name mismatch" "$j" "j['status']==400 and j['error']['code']==-32020"
j=$($C raw $U '@pad:5000000' '{"MCP-Protocol-Version":"2026-07-28","Mcp-Method":"tools/list"}')
check "http oversized -> 413" "$j" "j['status']==413"
j=$($C raw $U '{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}' '{"Origin":"http://evil.example"}')
check "http bad origin -> 403" "$j" "j['status']==403"
j=$($C call $U crash '{}' 2026-07-28)
check "http crash -> error" "$j" "'error' in j"
sleep 0.5
j=$($C list_tools $U 2025-11-25)
check "http server gone after crash" "$j" "'error' in j"

unset MCP_BEARER
S="stdio:python3 upstream.py stdio st"
for v in 2025-06-18 2025-11-25 2026-07-28; do
  j=$(MCP_TOOL_COUNT=3 $C list_tools "$S" $v)
  check "stdio list_tools $v" "$j" "j['version']=='$v' and j['names'][-1]=='tool_0002' and len(j['names'])==10"
  j=$(UPSTREAM_TOKEN=tok $C call "$S" whoami '{}' $v)
  check "stdio whoami $v" "$j" "json.loads(j['text'])=={'server':'st','mode':'stdio','credential':'tok'}"
  j=$($C resources "$S" $v)
  check "stdio resources $v" "$j" "j['read']['file:///readme.txt']=='readme of st'"
  j=$($C prompts "$S" $v)
  check "stdio prompts $v" "$j" "j['get']['admin_reset']=='Reset all the things.'"
  j=$($C watch "$S" 5 $v mutate 2>/dev/null)
  check "stdio watch $v" "$j" "j['arrived'] is True"
  j=$($C call "$S" crash '{}' $v)
  check "stdio crash $v" "$j" "'error' in j"
done
[ $FAIL = 0 ] && echo "ALL OK" || echo "SOME FAILED"
exit $FAIL
