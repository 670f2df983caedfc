"""Quick start 4: a DAG of agents built in Python."""

from oao.runtime.dag import GraphExecutor, TaskGraph, TaskNode


class Agent:
    def __init__(self, role):
        self.role = role

    def invoke(self, task):
        return {"output": f"[{self.role}] {task}"}


agent_researcher = Agent("researcher")
agent_writer = Agent("writer")
agent_critic = Agent("critic")
agent_polisher = Agent("polisher")

graph = TaskGraph()
graph.add_node(TaskNode("research", agent_researcher, "Research topic X"))
graph.add_node(TaskNode("draft", agent_writer, "Draft article", dependencies={"research"}))
graph.add_node(TaskNode("critique", agent_critic, "Critique draft", dependencies={"research"}))
graph.add_node(TaskNode("polisher", agent_polisher, "Improve draft", dependencies={"critique", "draft"}))
results = GraphExecutor(graph).execute("Write a blog post about AI")

for node_id, report in results.items():
    print(node_id, report.status)
print(results["polisher"].output)
